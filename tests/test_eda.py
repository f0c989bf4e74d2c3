"""EDA caption augmentation (parclip.defences.eda) and its offline WordNet reader (parclip.data.wordnet).

The WordNet tests read Debian's wordnet-base, which scripts/setup.sh installs (or $PARCLIP_WORDNET_DIR)."""
import random
from collections import Counter

import pytest

from parclip.data.captions import DataError
from parclip.data.wordnet import (
    ENV_VAR,
    WordNet,
    WordNetNotFoundError,
    find_wordnet_dir,
    load_wordnet,
    synonyms,
)
from parclip.defences.eda import (
    STOP_WORDS,
    clean_caption,
    eda,
    eda_captions,
    random_deletion,
    random_insertion,
    random_swap,
    synonym_replacement,
    wordnet_synonyms,
)

# --------------------------------------------------------------------------------------------------------------------
# WordNet reader


def test_known_synonyms():
    car = synonyms("car")
    assert {"automobile", "auto", "motorcar", "railcar"} <= set(car) and "car" not in car
    assert car.index("automobile") < car.index("railcar")  # first synset (the automobile sense) first
    assert len(car) == len(set(car)) and all(s == s.lower() and "_" not in s and "-" not in s for s in car)
    assert synonyms("Car") == car and synonyms("car") is not car  # case-insensitive; callers get their own list


def test_morphy_reduces_inflections():
    wn = load_wordnet()
    assert wn.morphy("dogs", "noun") == ["dog"]
    assert "domestic dog" in synonyms("dogs")
    assert wn.morphy("geese", "noun") == ["goose"]  # noun.exc
    assert wn.morphy("churches", "noun") == ["church"]  # ches -> ch
    assert wn.morphy("ran", "verb") == ["run"]  # verb.exc
    assert wn.morphy("walked", "verb") == ["walk"]  # ed -> ''
    assert wn.morphy("bigger", "adj") == ["bigger", "big"]  # itself (a lemma too) first, then adj.exc
    assert wn.morphy("tallest", "adj") == ["tall"] and wn.morphy("wisest", "adj") == ["wise"]  # est -> "", est -> e
    assert "merrily" in synonyms("happily")  # adverbs
    assert "sneaker" in synonyms("gym shoe") and "gym shoe" in synonyms("sneaker")  # collocations
    with pytest.raises(ValueError, match="pos must be one of"):
        wn.morphy("dog", "n")


def test_unknown_and_empty_words():
    assert synonyms("xyzzyqx") == [] and synonyms("") == [] and synonyms("   ") == []
    assert synonyms("of") == []  # a stop word WordNet does not know


def test_missing_wordnet_says_how_to_install(tmp_path, monkeypatch):
    with pytest.raises(WordNetNotFoundError, match="wordnet-base") as e:
        find_wordnet_dir(tmp_path / "nowhere")
    assert isinstance(e.value, DataError) and ENV_VAR in str(e.value)
    monkeypatch.setenv(ENV_VAR, str(tmp_path))  # exists but empty: named, no silent fall-back to /usr/share/wordnet
    with pytest.raises(WordNetNotFoundError, match=r"lacks index\.noun.*apt-get install wordnet-base"):
        load_wordnet()


def _fake_wordnet(folder):
    """A two-synset database in the real file format: license header, byte offsets, adjective markers."""
    folder.mkdir(parents=True, exist_ok=True)
    header = "  1 This software and database is being provided to you, the LICENSEE, by  \n"
    data = {"noun": [("{off} 05 n 02 Big_Cat 0 true-cat 1 000 | a cat", ["big_cat", "true-cat"])],
            "verb": [("{off} 30 v 01 purr 0 000 | make a sound", ["purr"])],
            "adj": [("{off} 00 a 02 large(a) 0 big(p) 0 000 | above average", ["large", "big"])],
            "adv": []}
    for pos, synsets in data.items():
        text, index = header, []
        for line, lemmas in synsets:
            off = len(text.encode())
            text += line.format(off=f"{off:08d}") + "  \n"
            index += [f"{lemma} {pos[0]} 1 0 1 0 {off:08d}  \n" for lemma in lemmas]
        (folder / f"data.{pos}").write_text(text)
        (folder / f"index.{pos}").write_text(header + "".join(sorted(index)))
    (folder / "noun.exc").write_text("big_cattes big_cat\n")


@pytest.mark.parametrize("layout", ["zip", "folder"])
def test_wordnet_found_in_nltk_data_folders(tmp_path, monkeypatch, layout):
    """`python -m nltk.downloader wordnet` leaves corpora/wordnet.zip (members wordnet/<file>) or the unzipped
    folder in an nltk data folder: found there when no system copy exists, and read the same way."""
    import zipfile

    from parclip.data import wordnet as wn_module

    _fake_wordnet(tmp_path / "src")
    corpora = tmp_path / "nltk_data" / "corpora"
    corpora.mkdir(parents=True)
    if layout == "zip":
        with zipfile.ZipFile(corpora / "wordnet.zip", "w") as z:
            for f in sorted((tmp_path / "src").iterdir()):
                z.write(f, f"wordnet/{f.name}")
    else:
        (tmp_path / "src").rename(corpora / "wordnet")
    monkeypatch.delenv(ENV_VAR, raising=False)
    monkeypatch.delenv("NLTK_DATA", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/nltk_data of the machine's user either
    monkeypatch.setattr(wn_module, "SEARCH_PATHS", ())  # no Debian copy: only nltk's folders are left
    with pytest.raises(WordNetNotFoundError, match=r"nltk_data.*nltk\.downloader wordnet"):
        find_wordnet_dir()  # before NLTK_DATA points there: the message names nltk's folders and its downloader
    monkeypatch.setenv("NLTK_DATA", str(tmp_path / "nltk_data"))
    found = find_wordnet_dir()
    assert found == (corpora / ("wordnet.zip" if layout == "zip" else "wordnet")).resolve()
    wn = WordNet(found)
    assert wn.synonyms("big_cattes") == ["big cat", "true cat"]  # the exception list is read from the zip too
    assert wn.synonyms("big") == ["large"]


def test_reader_on_a_hand_made_database(tmp_path):
    _fake_wordnet(tmp_path)
    wn = WordNet(tmp_path)
    assert wn.synonyms("big cat") == ["true cat"]  # '_' and '-' -> space, lowercase, the word itself dropped
    assert wn.synonyms("big_cats") == ["big cat", "true cat"]  # s -> '' ; the query itself is 'big cats'
    assert wn.synonyms("big cattes") == ["big cat", "true cat"]  # exception list
    assert wn.synonyms("big") == ["large"]  # (a)/(p) markers dropped
    assert wn.synonyms("purrs") == ["purr"] and wn.synsets("purring")[0][0] == "verb"
    assert wn.synonyms("dog") == []


# --------------------------------------------------------------------------------------------------------------------
# EDA


def test_clean_caption():
    assert clean_caption("A photo of a T-Shirt.") == "a photo of a t shirt"
    assert clean_caption("  Don't  panic: 42 dogs,\tthree cats!\n") == "dont panic dogs three cats"
    assert clean_caption("...") == "" and clean_caption("") == ""
    assert clean_caption(clean_caption("It's 5 o'clock - Café")) == clean_caption("It's 5 o'clock - Café")


def test_stop_words():
    assert {"a", "an", "the", "of", "in", "is", "and", "they", "would"} <= STOP_WORDS
    assert isinstance(STOP_WORDS, frozenset) and all(clean_caption(w) == w for w in STOP_WORDS)
    assert not {"dog", "photo", "car", "woman"} & STOP_WORDS


WORDS = ["the", "quick", "brown", "dog", "jumps", "over", "the", "lazy", "dog", "near", "a", "red", "car"]


def test_synonym_replacement():
    syn = wordnet_synonyms()
    for seed in range(20):
        out = synonym_replacement(WORDS, 2, random.Random(seed))
        assert len(out) == len(WORDS)
        changed = {w for w, o in zip(WORDS, out) if w != o}
        assert len(changed) == 2 and not changed & STOP_WORDS
        for w in changed:  # every occurrence, by one synonym of that word
            new = {o for v, o in zip(WORDS, out) if v == w}
            assert len(new) == 1 and new.pop() in syn(w)
    assert synonym_replacement(["the", "of", "xyzzyqx"], 1, random.Random(0)) == ["the", "of", "xyzzyqx"]
    assert synonym_replacement(WORDS, 1, random.Random(3)) == synonym_replacement(WORDS, 1, random.Random(3))


def test_random_insertion():
    syn = wordnet_synonyms()
    words = ["dog", "photo", "xyzzyqx"]
    for seed in range(20):
        out = random_insertion(words, 3, random.Random(seed))
        assert len(out) == len(words) + 3
        inserted = list((Counter(out) - Counter(words)).elements())
        pool = set(out)
        assert all(any(s in syn(w) for w in pool) for s in inserted)
        it = iter(out)
        assert all(w in it for w in words)  # the original words keep their order
    assert random_insertion(["xyzzyqx"], 2, random.Random(0)) == ["xyzzyqx"]  # nothing has synonyms: gives up
    assert random_insertion([], 2, random.Random(0)) == []
    out = random_insertion(["a", "dog"], 5, random.Random(0), stop_words=STOP_WORDS)  # "a" (vitamin a, ...) never drawn
    inserted = list((Counter(out) - Counter(["a", "dog"])).elements())
    assert len(inserted) == 5 and all(any(s in syn(w) for w in out if w != "a") for s in inserted)


def test_random_swap():
    for seed in range(20):
        out = random_swap(WORDS, 2, random.Random(seed))
        assert sorted(out) == sorted(WORDS)
    distinct = ["a", "b", "c", "d"]
    assert all(random_swap(distinct, 1, random.Random(s)) != distinct for s in range(20))
    assert random_swap(["one"], 3, random.Random(0)) == ["one"] and random_swap([], 1, random.Random(0)) == []
    assert distinct == ["a", "b", "c", "d"]  # inputs are never modified


def test_random_deletion():
    for seed in range(20):
        out = random_deletion(WORDS, 0.3, random.Random(seed))
        it = iter(WORDS)
        assert out and all(w in it for w in out)  # an order-keeping subsequence, never empty
    assert len(random_deletion(WORDS, 1.0, random.Random(0))) == 1
    assert random_deletion(WORDS, 0.0, random.Random(0)) == WORDS
    assert random_deletion(["alone"], 1.0, random.Random(0)) == ["alone"] and random_deletion([], 0.5, random.Random(0)) == []


# a synonym source with one-word synonyms, so that every operator's result can be explained exactly
FAKE = {"photo": ("picture", "snapshot"), "sneaker": ("trainer",), "boot": ("kick",), "ankle": ("joint",)}


def _fake(word):
    return FAKE.get(word, ())


def _explanations(words, out):
    ops = set()
    if sorted(out) == sorted(words):
        ops.add("rs")
    it = iter(words)
    if out and all(w in it for w in out) and len(out) < len(words):
        ops.add("rd")
    it = iter(out)
    if len(out) > len(words) and all(w in it for w in words) \
            and all(any(s in _fake(w) for w in out) for s in (Counter(out) - Counter(words)).elements()):
        ops.add("ri")
    if len(out) == len(words) and any(w != o for w, o in zip(words, out)):
        mapping = {}
        ok = all(o == w or o in _fake(w) for w, o in zip(words, out))
        ok = ok and all(mapping.setdefault(w, o) == o for w, o in zip(words, out))
        if ok:
            ops.add("sr")
    return ops


def test_eda_applies_exactly_one_operator():
    caption = "A photo of an ankle boot, next to a sneaker."
    words = clean_caption(caption).split()
    seen = Counter()
    for seed in range(400):
        out = eda(caption, random.Random(seed), synonyms=_fake).split()
        ops = _explanations(words, out)
        assert ops, (out, "not explained by one operator")
        if len(ops) == 1:
            seen[ops.pop()] += 1
    assert set(seen) == {"sr", "ri", "rs", "rd"} and min(seen.values()) > 40  # uniform choice: about 100 each


def test_eda_edge_cases():
    rng = random.Random(0)
    assert eda("", rng) == "" and eda(" ... 42 !", rng) == ""
    assert eda("A Photo, of a DOG!", rng, alpha_sr=0, alpha_ri=0, alpha_rs=0, p_rd=0) == "a photo of a dog"
    assert eda("one two", rng, alpha_sr=0, alpha_ri=0, p_rd=0) == "two one"  # only RS is left
    with pytest.raises(ValueError, match=r"eda: alpha_sr must be a number in \[0, 1\]"):
        eda("a dog", rng, alpha_sr=1.5)
    out = eda("a photo of a dog", random.Random(1))  # real WordNet: a clean caption
    assert out and clean_caption(out) == out


FASHION = ["a photo of a sneaker.", "a photo of an ankle boot.", "a photo of a t-shirt.", "a photo of a dress.",
           "a photo of a bag.", "", "a photo of a pullover."] * 30


def test_eda_captions_is_seeded_per_caption():
    a = eda_captions(FASHION, seed=0)
    assert len(a) == len(FASHION) and a == eda_captions(FASHION, seed=0)
    assert a != eda_captions(FASHION, seed=1)
    assert all(out == "" for cap, out in zip(FASHION, a) if not cap)
    assert len(set(a)) > 20  # repeated captions get different twins
    # a twin depends on (seed, key, caption) only: a slice with its original indices as keys gives the same twins
    assert eda_captions(FASHION[50:], seed=0, keys=range(50, len(FASHION))) == a[50:]
    import numpy as np
    assert eda_captions(FASHION[:5], keys=np.arange(5)) == a[:5]
    with pytest.raises(ValueError, match="one entry per caption"):
        eda_captions(FASHION, keys=[1, 2])
    with pytest.raises(TypeError, match="unknown argument"):
        eda_captions(FASHION, alpha=0.2)
