"""Chores every part of parclip shares: crash-safe file writing (`files`), argument checks (`checks`) and the
process-group plumbing of multi-GPU runs (`distributed`). Nothing here knows about CLIP."""
