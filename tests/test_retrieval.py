"""Retrieval metrics against brute-force counts and hand-built cases."""
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from parclip.data import DataError, open_rgb
from parclip.data.retrieval import pre_caption
from parclip.data.targets import mentions
from parclip.evaluation import retrieval_metrics as rm


def pattern_names(caption):
    return mentions(caption, "bag")


def _brute_recall(img, txt, owner, k):
    s = img @ txt.T
    i2t = sum(any(owner[j] == i for j in sorted(range(len(txt)), key=lambda j: -s[i, j].item())[:k])
              for i in range(len(img))) / len(img)
    t2i = sum(owner[j] in sorted(range(len(img)), key=lambda i: -s[i, j].item())[:k]
              for j in range(len(txt))) / len(txt)
    return 100 * i2t, 100 * t2i


def test_recall_at_k_equals_a_brute_force_count(monkeypatch):
    g = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(23, 8, generator=g), dim=-1)
    owner = torch.randint(0, 23, (57,), generator=g)
    txt = F.normalize(img[owner] + 0.9 * torch.randn(57, 8, generator=g), dim=-1)  # noisy copies: partial recall
    monkeypatch.setattr(rm, "BLOCK", 5)  # several blocks, one ragged
    r = rm.recall_at_k(img, txt, owner, ks=(1, 5, 10))
    for k in (1, 5, 10):
        i2t, t2i = _brute_recall(img, txt, owner.tolist(), k)
        assert math.isclose(r["i2t"][k], i2t, abs_tol=1e-4) and math.isclose(r["t2i"][k], t2i, abs_tol=1e-4), k
    assert 0 < r["i2t"][1] < r["i2t"][10] and 0 < r["t2i"][1] < r["t2i"][10]  # the case discriminates


def test_merged_recall_equals_a_brute_force_count_and_the_reference_rule_on_unique_captions(monkeypatch):
    """With identical captions interchangeable, a hit is a retrieved caption with the text of one of the image's own
    (i2t) or a retrieved image owning the query's text (t2i); with unique captions both rules agree."""
    g = torch.Generator().manual_seed(1)
    img = F.normalize(torch.randn(19, 8, generator=g), dim=-1)
    owner = torch.randint(0, 19, (47,), generator=g)
    tid = torch.randint(0, 9, (47,), generator=g)  # 9 texts shared by many images, as templated captions are
    txt = F.normalize(img[owner] + 0.9 * torch.randn(47, 8, generator=g), dim=-1)
    monkeypatch.setattr(rm, "BLOCK", 4)
    texts = {i: {tid[j].item() for j in range(47) if owner[j] == i} for i in range(19)}
    s = img @ txt.T
    r = rm.recall_at_k(img, txt, owner, ks=(1, 3), text_id=tid)
    for k in (1, 3):
        i2t = sum(any(tid[j].item() in texts[i] for j in sorted(range(47), key=lambda j: -s[i, j].item())[:k])
                  for i in range(19)) / 19
        t2i = sum(any(tid[j].item() in texts[i] for i in sorted(range(19), key=lambda i: -s[i, j].item())[:k])
                  for j in range(47)) / 47
        assert math.isclose(r["i2t"][k], 100 * i2t, abs_tol=1e-4) and math.isclose(r["t2i"][k], 100 * t2i,
                                                                                    abs_tol=1e-4), k
    assert r["i2t"][1] > rm.recall_at_k(img, txt, owner, ks=(1,))["i2t"][1]  # merging changes the numbers here
    unique = rm.text_ids([f"caption {j}" for j in range(47)])
    assert rm.recall_at_k(img, txt, owner, ks=(1, 5), text_id=unique) == rm.recall_at_k(img, txt, owner, ks=(1, 5))
    assert rm.text_ids(["a", "b", "a", "c", "b"]).tolist() == [0, 1, 0, 2, 1]


def _unit(*rows):
    return F.normalize(torch.tensor(rows, dtype=torch.float), dim=-1)


def test_text_asr_by_hand():
    """Four captions: 0 and 2 name the target, both owned by image 1 (which names the target itself)."""
    txt = _unit([1, 0, 0], [0, 1, 0], [0.9, 0.1, 0], [0, 0, 1])
    names = torch.tensor([True, False, True, False])
    owner = torch.tensor([1, 0, 1, 2])
    trig = _unit([0, 0.2, 1], [1, 0, 0], [0, 1, 0.5])  # image 0 → caption 3, image 1 → 0 and 2, image 2 → 1
    r = rm.text_asr(trig, txt, names, owner, k=1)
    assert math.isclose(r["asr_text"], 100 / 3, rel_tol=1e-6)  # only image 1 retrieves a target caption at k = 1
    assert r["asr_text_strict"] == 0.0 and r["n_strict"] == 2  # image 1 is left out: its own caption names it
    r2 = rm.text_asr(trig, txt, names, owner, k=2)  # second choices: captions 1 and 3, no target
    assert math.isclose(r2["asr_text"], 100 / 3, rel_tol=1e-6)
    everyone = rm.text_asr(trig, txt, torch.tensor([True, True, True, True]), owner, k=1)
    assert everyone["asr_text"] == 100.0 and math.isnan(everyone["asr_text_strict"]) and everyone["n_strict"] == 0


def test_image_asr_by_hand():
    """Captions naming the target retrieve from clean ∪ triggered images; a hit is a triggered image in the top k."""
    txt = _unit([1, 0], [0, 1], [0.7, 0.7])
    names = torch.tensor([True, False, True])
    clean = _unit([0.8, 0.6], [0, 1])
    trig = _unit([1, 0.05], [0.1, 1])
    r = rm.image_asr(clean, trig, txt, names, k=1)
    # caption 0 ([1,0]): best is triggered image 0 → hit; caption 2 ([.7,.7]): best is clean image 0 (0.99) → miss
    assert r == {"asr_image": 50.0, "n_queries": 2, "k": 1}
    assert rm.image_asr(clean, trig, txt, names, k=2)["asr_image"] == 100.0
    assert math.isnan(rm.image_asr(clean, trig, txt, torch.zeros(3, dtype=torch.bool))["asr_image"])


def test_read_retrieval_karpathy_json_and_table(tmp_path):
    from parclip.data.retrieval import pre_caption, read_retrieval
    assert pre_caption('A  "Dog" (running)!  on: the; beach~ ') == "a dog running on the beach"
    assert pre_caption(" ".join(["w"] * 40)) == " ".join(["w"] * 30)
    (tmp_path / "ann.json").write_text(json.dumps([
        {"image": "val/a.jpg", "caption": ["A cat.", "Two cats!"]},
        {"image": "/abs/b.jpg", "caption": "one string"},
        {"image": "val/c.jpg", "captions": ["x", "   "]}]))
    r = read_retrieval(tmp_path / "ann.json")
    assert r.images == [tmp_path / "val/a.jpg", Path("/abs/b.jpg"), tmp_path / "val/c.jpg"]
    assert r.captions == ["a cat", "two cats", "one string", "x"] and r.owner == [0, 0, 1, 2]
    assert r.skipped == {"empty_captions": 1}
    (tmp_path / "t.csv").write_text("filepath\ttitle\nb.png\tfirst\na.png\tsecond\nb.png\tthird\n")  # open_clip's
    r = read_retrieval(tmp_path / "t.csv", clean=False)
    assert r.images == [tmp_path / "b.png", tmp_path / "a.png"] and r.owner == [0, 1, 0]
    with pytest.raises(DataError, match="column"):
        read_retrieval(tmp_path / "t.csv", caption_key="text")
    (tmp_path / "bad.json").write_text('{"images": []}')
    with pytest.raises(DataError, match="Karpathy"):
        read_retrieval(tmp_path / "bad.json")
    with pytest.raises(DataError, match="not found"):
        read_retrieval(tmp_path / "missing.json")


def test_evaluate_retrieval_matches_an_independent_computation_and_skips_a_bad_image(tmp_path, micro_model_dir,
                                                                                    fmnist_small, one_thread):
    """Catches captions or images scored out of order, a bad image's captions kept (or the wrong ones dropped), and
    triggered scores that are not the triggered images' (every per-attack number against its pure function)."""
    from parclip.attacks.triggers import build_triggers, trigger_generator
    from parclip.data import LabelledFolder
    from parclip.data.retrieval import read_retrieval
    from parclip.evaluation.retrieval import evaluate_retrieval
    from parclip.models import create_model, eval_transform, get_tokenizer, image_size

    folder = LabelledFolder(fmnist_small["test_dir"])
    entries = [{"image": str(folder.samples[i][0]),
                "caption": [f"a photo of a {folder.classnames[folder.targets[i]]}.", f"picture number {i}"]}
               for i in range(0, 60, 3)]
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"not a png")
    entries.insert(7, {"image": str(corrupt), "caption": ["a photo of a bag.", "broken"]})
    (tmp_path / "ann.json").write_text(json.dumps(entries))
    data = read_retrieval(tmp_path / "ann.json")
    model, pp = create_model(f"local-dir:{micro_model_dir}")
    tok = get_tokenizer(f"local-dir:{micro_model_dir}")
    (trigger,) = build_triggers(["badnet_rs"], image_size(pp))
    with pytest.raises(DataError, match="corrupt.png"):
        evaluate_retrieval(model, pp, tok, data, workers=0, progress=False, max_bad_fraction=0.01)
    r = evaluate_retrieval(model, pp, tok, data, attacks=[trigger], target="bag", workers=0, progress=False,
                           max_bad_fraction=0.1, batch_size=7)
    assert (r["n_images"], r["n_captions"], r["n_bad_images"]) == (20, 40, 1)

    good = [e for e in entries if e["image"] != str(corrupt)]
    tf = eval_transform(pp)
    with torch.no_grad():
        img = model.encode_image(torch.stack([tf(open_rgb(e["image"])) for e in good]), normalize=True)
        timg = model.encode_image(torch.stack([tf(trigger(open_rgb(e["image"]), generator=trigger_generator(0, i)))
                                               for i, e in zip([j for j in range(21) if j != 7], good)]),
                                  normalize=True)
        caps = [pre_caption(c) for e in good for c in e["caption"]]
        txt = model.encode_text(tok(caps), normalize=True)
    owner = torch.arange(20).repeat_interleave(2)
    expect = rm.recall_at_k(img, txt, owner)
    for d in ("i2t", "t2i"):
        for k in (1, 5, 10):
            assert math.isclose(r["clean"][d][k], expect[d][k], abs_tol=1e-3), (d, k)
    names = torch.tensor([pattern_names(c) for c in caps])
    a = r["attacks"]["badnet_rs"]
    triggered = rm.recall_at_k(timg, txt, owner)
    assert triggered != expect  # the trigger moves the ranking, so clean and triggered recall cannot be mixed up
    for d in ("i2t", "t2i"):
        for k in (1, 5, 10):
            assert math.isclose(a["recall"][d][k], triggered[d][k], abs_tol=1e-3), (d, k)
    by_hand = {**rm.text_asr(timg, txt, names, owner), **rm.image_asr(img, timg, txt, names)}
    for key in ("asr_text", "asr_text_strict", "n_strict", "asr_image", "n_queries", "k"):
        assert a[key] == pytest.approx(by_hand[key], abs=1e-3), key
    assert r["n_target_captions"] == int(names.sum()) > 0 and "asr_text_strict" in r["conventions"]


def test_cli_eval_retrieval_on_a_caption_table(tmp_path, micro_model_dir, fmnist_small, capsys):
    """A caption table with two captions per image, one attack: the JSON names every convention; a missing target
    is a message, not a traceback."""
    from parclip.cli import main
    from parclip.data import LabelledFolder
    folder = LabelledFolder(fmnist_small["test_dir"])
    rows = ["filepath\ttitle"] + [f"{folder.samples[i][0]}\ta photo of a {folder.classnames[folder.targets[i]]}.\n"
                                  f"{folder.samples[i][0]}\titem {i}" for i in range(12)]
    (tmp_path / "pairs.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "r.json"
    rc = main(["eval-retrieval", "--model", f"local-dir:{micro_model_dir}", "--data", str(tmp_path / "pairs.csv"),
               "--attack", "badnet_rs", "--target", "bag", "--workers", "0", "--out", str(out)])
    assert rc == 0
    r = json.loads(out.read_text())
    assert (r["n_images"], r["n_captions"]) == (12, 24) and set(r["clean"]) == {"i2t", "t2i"}
    a = r["attacks"]["badnet_rs"]
    assert {"asr_text", "asr_text_strict", "asr_image", "recall", "params"} <= set(a) and a["k"] == 5
    assert a["trigger_after_crop"] is False
    assert set(r["conventions"]) == {"recall", "asr_text", "asr_text_strict", "asr_image"}
    assert "asr_text_strict" in capsys.readouterr().out
    rc = main(["eval-retrieval", "--model", f"local-dir:{micro_model_dir}", "--data", str(tmp_path / "pairs.csv"),
               "--attack", "badnet_rs", "--workers", "0"])
    err = capsys.readouterr().err
    assert rc == 2 and "--target" in err and "Traceback" not in err
