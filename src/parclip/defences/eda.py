"""EDA (Easy Data Augmentation, Wei & Zou 2019, arXiv 1901.11196) of captions, for CleanCLIP's and RoCLIP's text twins.

A caption is cleaned (:func:`clean_caption`) and split into words w = (w_1, …, w_L). With n_op = max(1, ⌊α_op · L⌋)
and syn(w) the WordNet synonyms of w (:mod:`parclip.data.wordnet`, cleaned like captions, w itself excluded):

* **SR**, synonym replacement (:func:`synonym_replacement`, n = n_sr): take the distinct words that are not stop words
  (:data:`STOP_WORDS`) in a random order; for each with syn(w) ≠ ∅, replace *every* occurrence of w by one
  s ~ U(syn(w)); stop after n words have been replaced (fewer if fewer have synonyms).
* **RI**, random insertion (:func:`random_insertion`, n = n_ri): n times: draw w ~ U(current words) until syn(w) ≠ ∅
  (at most 10 draws, else this insertion is skipped), then insert s ~ U(syn(w)) at a position ~ U{0, …, len}.
* **RS**, random swap (:func:`random_swap`, n = n_rs): n times: swap the words at two distinct positions i ≠ j drawn
  uniformly (nothing when L < 2).
* **RD**, random deletion (:func:`random_deletion`, p = p_rd): keep each word independently with probability 1 − p;
  if none is kept, keep one uniformly drawn word; a one-word caption is returned unchanged.

:func:`eda` applies **exactly one** operator per caption, chosen uniformly among the four, and returns the result
cleaned again (multi-word synonyms such as "domestic dog" simply become several words).

**The reference's behaviour** (EDA's code as CleanCLIP calls it, ``num_aug=1``): it builds one candidate with each of
the four operators, shuffles the four candidates and keeps the first, i.e. a uniform choice of one operator. The
augmented caption is computed *once per data set* (a preprocessing pass writes it next to the original caption);
during training only the images are re-augmented each epoch, the text twin stays fixed.

**Our differences** (none changes the distribution of the operator choice):

* We draw the operator first and compute only that one (4× cheaper); the reference computes all four and keeps one.
* Randomness is explicit: every function takes a ``random.Random``; :func:`eda_captions` seeds one per caption from
  (seed, key) (see there). The reference calls ``random.seed(1)`` at import and walks the global RNG, and builds
  synonym lists through a ``set``, whose order changes with Python's hash seed, so its output is not reproducible
  across runs; our synonym lists keep WordNet's order.
* RI inserts a *random* synonym (the reference inserts the first element of its set-ordered list) at one of the
  L + 1 positions (the reference never appends at the end); RS always swaps two distinct positions (the reference gives
  up a swap when a few draws in a row give j = i).
* An operator whose α (or p) is 0 is never chosen (EDA's code builds no candidate for it either); with all four at 0
  the caption is only cleaned.
* Synonyms are cleaned like captions (non-letters → spaces); the reference deletes non-letters.

As in the reference, SR skips stop words but RI does not (so "a photo of a sneaker" can grow "adenine", a WordNet
sense of "a"); pass ``stop_words=STOP_WORDS`` to :func:`random_insertion` or ``ri_stop_words`` to :func:`eda` to skip
them there too.
"""
from __future__ import annotations

import functools
import numbers
import os
import random
import re
from collections.abc import Callable, Collection, Hashable, Sequence

from parclip.data.wordnet import WordNet, load_wordnet
from parclip.utils.checks import check_int, check_unit
from parclip.utils.progress import progress_bar

__all__ = ["OPERATORS", "STOP_WORDS", "clean_caption", "eda", "eda_captions", "random_deletion", "random_insertion",
           "random_swap", "synonym_replacement", "wordnet_synonyms"]

#: English function words SR never replaces: articles, determiners, pronouns, prepositions, conjunctions, auxiliary and
#: modal verbs, common adverbs of degree/negation, in the cleaned form (no apostrophes)
STOP_WORDS: frozenset[str] = frozenset((
    "a", "an", "the",
    "this", "that", "these", "those", "such",
    "i", "me", "my", "mine", "myself", "we", "us", "our", "ours", "ourselves", "you", "your", "yours", "yourself",
    "yourselves", "he", "him", "his", "himself", "she", "her", "hers",
    "herself", "it", "its", "itself", "they", "them", "their", "theirs", "themselves", "one", "ones", "oneself",
    "who", "whom", "whose", "which", "what", "whatever", "whoever", "whichever",
    "some", "any", "no", "none", "all", "both", "each", "either", "neither", "every", "few", "more", "most", "other",
    "another", "many", "much", "several", "own", "same",
    "about", "above", "across", "after", "against", "along", "amid", "among", "around", "as", "at", "before",
    "behind", "below", "beneath", "beside", "besides", "between",
    "beyond", "by", "down", "during", "except", "for", "from", "in", "inside", "into", "like", "near", "of", "off",
    "on", "onto", "out", "outside", "over", "past", "per", "since",
    "than", "through", "throughout", "till", "to", "toward", "towards", "under", "underneath", "until", "unto", "up",
    "upon", "via", "with", "within", "without",
    "and", "but", "or", "nor", "so", "yet", "if", "then", "else", "because", "while", "whereas", "although", "though",
    "unless", "whether", "once",
    "am", "is", "are", "was", "were", "be", "been", "being",
    "have", "has", "had", "having", "do", "does", "did", "doing", "done",
    "will", "would", "shall", "should", "can", "could", "may", "might", "must", "ought",
    "not", "nt", "dont", "doesnt", "didnt", "isnt", "arent", "wasnt", "werent", "wont", "wouldnt", "cant", "cannot",
    "couldnt", "shouldnt", "hasnt", "havent", "hadnt",
    "im", "ive", "youre", "youve", "youd", "youll", "hes", "shes", "theyre", "theyve", "theyd", "theyll", "weve",
    "thats",
    "theres", "heres", "whats", "whos",
    "here", "there", "when", "where", "why", "how",
    "very", "too", "also", "just", "only", "even", "still", "again", "ever", "now", "s", "t", "d", "ll", "m", "o",
    "re", "ve", "y",
))

#: the four operators, in the order :func:`eda` numbers them
OPERATORS = ("sr", "ri", "rs", "rd")

#: how many random words RI draws before it gives up one insertion (the reference's 10)
RI_MAX_TRIES = 10

#: lists at least this long get a progress bar (when stderr is a terminal)
PROGRESS_MIN = 5000

_NON_LETTERS = re.compile(r"[^a-z ]+")

Synonyms = Callable[[str], Sequence[str]]


def clean_caption(text: str) -> str:
    """Lowercase, drop apostrophes, ``-`` → space, every other non-letter (digits, punctuation, whitespace) → space,
    collapse runs of spaces, strip. Letters are a–z only: accented letters count as non-letters, as in the reference."""
    text = text.lower().replace("'", "").replace("\u2019", "").replace("-", " ")
    return " ".join(_NON_LETTERS.sub(" ", text).split())


@functools.lru_cache(maxsize=8)
def _cleaned_synonyms(wordnet: WordNet) -> Synonyms:
    @functools.lru_cache(maxsize=1 << 17)
    def synonyms(word: str) -> tuple[str, ...]:
        out: dict[str, None] = {}
        for name in wordnet.synonyms(word):
            name = clean_caption(name)
            if name and name != word:
                out.setdefault(name, None)
        return tuple(out)

    return synonyms


def wordnet_synonyms(wordnet: WordNet | None = None) -> Synonyms:
    """The synonym function the operators use by default: ``word -> tuple`` of WordNet synonyms cleaned with
    :func:`clean_caption` (empty and self-synonyms dropped, WordNet's order), cached. ``wordnet`` defaults to
    :func:`parclip.data.wordnet.load_wordnet` (raises ``WordNetNotFoundError`` with install instructions)."""
    return _cleaned_synonyms(wordnet if wordnet is not None else load_wordnet())


def _source(synonyms: Synonyms | None) -> Synonyms:
    return synonyms if synonyms is not None else wordnet_synonyms()


# --------------------------------------------------------------------------------------------------------------------
# The four operators: pure functions of (words, n or p, rng); they never modify `words`.


def synonym_replacement(words: Sequence[str], n: int, rng: random.Random, *, synonyms: Synonyms | None = None,
                        stop_words: Collection[str] = STOP_WORDS) -> list[str]:
    """SR: replace every occurrence of each of up to ``n`` distinct non-stop-words (taken in random order among those
    with synonyms) by one synonym drawn uniformly. Words without synonyms are skipped, so fewer than ``n`` words may
    change."""
    syn = _source(synonyms)
    candidates = [w for w in dict.fromkeys(words) if w not in stop_words]
    rng.shuffle(candidates)
    replacement: dict[str, str] = {}
    for word in candidates:
        if len(replacement) >= n:
            break
        options = syn(word)
        if options:
            replacement[word] = rng.choice(options)
    return [replacement.get(w, w) for w in words]


def random_insertion(words: Sequence[str], n: int, rng: random.Random, *, synonyms: Synonyms | None = None,
                     stop_words: Collection[str] = frozenset(), max_tries: int = RI_MAX_TRIES) -> list[str]:
    """RI: ``n`` times, insert a uniformly drawn synonym of a uniformly drawn current word (one with synonyms, at most
    ``max_tries`` draws, else that insertion is skipped; words in ``stop_words`` are never drawn) at a uniform position
    in 0..len. An inserted synonym is one list item even when it has several words, so ``len`` grows by at most n."""
    syn = _source(synonyms)
    out = list(words)
    for _ in range(n):
        pool = [w for w in out if w not in stop_words]
        if not pool:
            break
        for _try in range(max_tries):
            options = syn(rng.choice(pool))
            if options:
                out.insert(rng.randint(0, len(out)), rng.choice(options))
                break
    return out


def random_swap(words: Sequence[str], n: int, rng: random.Random) -> list[str]:
    """RS: ``n`` times, swap the words at two distinct uniformly drawn positions; fewer than two words: unchanged."""
    out = list(words)
    if len(out) < 2:
        return out
    for _ in range(n):
        i, j = rng.sample(range(len(out)), 2)
        out[i], out[j] = out[j], out[i]
    return out


def random_deletion(words: Sequence[str], p: float, rng: random.Random) -> list[str]:
    """RD: keep each word with probability 1 − p (independently, order kept); if none is kept, keep one uniformly drawn
    word. Zero or one word: unchanged."""
    if len(words) <= 1:
        return list(words)
    kept = [w for w in words if rng.random() > p]
    return kept if kept else [rng.choice(list(words))]


# --------------------------------------------------------------------------------------------------------------------
# One caption, many captions


def eda(caption: str, rng: random.Random, *, alpha_sr: float = 0.1, alpha_ri: float = 0.1, alpha_rs: float = 0.1,
        p_rd: float = 0.1, synonyms: Synonyms | None = None, ri_stop_words: Collection[str] = frozenset()) -> str:
    """The EDA twin of ``caption``: clean it, draw one operator uniformly among SR, RI, RS, RD (those with α > 0,
    resp. p > 0), apply it with n = max(1, ⌊α · #words⌋), and return the result cleaned. The operator is drawn first and
    only that one is computed (the reference computes all four and keeps one at random: the same distribution). An
    empty caption (after cleaning) stays empty; with every α and p at 0 the cleaned caption is returned."""
    alphas = {"sr": check_unit("alpha_sr", alpha_sr, owner="eda"), "ri": check_unit("alpha_ri", alpha_ri, owner="eda"),
              "rs": check_unit("alpha_rs", alpha_rs, owner="eda"), "rd": check_unit("p_rd", p_rd, owner="eda")}
    words = clean_caption(caption).split()
    if not words:
        return ""
    active = [op for op in OPERATORS if alphas[op] > 0]
    if not active:
        return " ".join(words)
    op = active[rng.randrange(len(active))]
    if op == "rd":
        out = random_deletion(words, p_rd, rng)
    else:
        n = max(1, int(alphas[op] * len(words)))
        if op == "sr":
            out = synonym_replacement(words, n, rng, synonyms=synonyms)
        elif op == "ri":
            out = random_insertion(words, n, rng, synonyms=synonyms, stop_words=ri_stop_words)
        else:
            out = random_swap(words, n, rng)
    return clean_caption(" ".join(out))


def _key(key: Hashable) -> Hashable:
    """Keys that mean the same row seed the same RNG: numpy/other integers → int, paths → str."""
    if isinstance(key, numbers.Integral) and not isinstance(key, bool):
        return int(key)
    return os.fspath(key) if isinstance(key, os.PathLike) else key


def eda_captions(captions: Sequence[str], seed: int = 0, *, keys: Sequence[Hashable] | None = None,
                 synonyms: Synonyms | None = None, **alphas) -> list[str]:
    """The EDA twin of every caption (:func:`eda`; ``alphas``: ``alpha_sr``, ``alpha_ri``, ``alpha_rs``, ``p_rd``,
    ``ri_stop_words``), computed once per data set as in CleanCLIP.

    Seeding is per caption: caption i uses ``random.Random(f"parclip-eda|{seed}|{keys[i]!r}")`` (string seeds are hashed
    with SHA-512, so this is the same in every process and Python version), with ``keys`` defaulting to the indices
    0..N-1 (integers of any type seed as ``int``, paths as ``str``). A twin therefore depends only on (seed, key, caption): the result is deterministic, any slice of the list
    can be computed in another process, and passing stable ``keys`` (image paths, original row numbers) keeps every
    twin unchanged when other rows are filtered out. A progress bar is shown for long lists on a terminal.

    WordNet is loaded before the first caption, so a missing database fails at once with install instructions.
    """
    check_int("seed", seed, owner="eda_captions")
    if keys is not None and len(keys) != len(captions):
        raise ValueError(f"eda_captions: keys must have one entry per caption ({len(captions)}), got {len(keys)}")
    unknown = set(alphas) - {"alpha_sr", "alpha_ri", "alpha_rs", "p_rd", "ri_stop_words"}
    if unknown:
        raise TypeError(f"eda_captions: unknown argument(s) {', '.join(sorted(unknown))}; "
                        f"expected alpha_sr, alpha_ri, alpha_rs, p_rd, ri_stop_words")
    syn = _source(synonyms)
    out = []
    for i, caption in progress_bar(enumerate(captions), total=len(captions), min_total=PROGRESS_MIN, mininterval=0.5,
                                       desc="EDA captions", unit="cap"):
        out.append(eda(caption, random.Random(f"parclip-eda|{seed}|{_key(i if keys is None else keys[i])!r}"),
                       synonyms=syn, **alphas))
    return out
