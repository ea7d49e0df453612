"""Tests of the demo's dataset builders (on tiny fixtures) and of the fine-tuning loop.

None of them needs the demo's installed packages, so CI can run them before `make demo`.
"""

from __future__ import annotations

import base64
import importlib.util
import json
import random
import sys
from pathlib import Path

import pytest
import torch

from fmerge.errors import FmergeError
from fmerge.finetune import finetune_classifier, fresh_classifier, tensor_batches

ROOT = Path(__file__).resolve().parents[1]


def _load_build_data():
    spec = importlib.util.spec_from_file_location("build_data", ROOT / "demo" / "build_data.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["build_data"] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


bd = _load_build_data()


# --- parsers ------------------------------------------------------------------------------------


def test_split_fortunes_on_percent_lines_only():
    text = "first\nline two\n%\n100% sure, not a separator\n%\n\n%\n  %  \nlast\n%\n"
    assert bd.split_fortunes(text) == ["first\nline two", "100% sure, not a separator", "last"]


def test_read_text_falls_back_to_latin1(tmp_path):
    (tmp_path / "u").write_bytes("Grüße, señor".encode("utf-8"))
    (tmp_path / "l").write_bytes("Grüße, señor".encode("latin-1"))
    assert bd.read_text(tmp_path / "u") == "Grüße, señor"
    assert bd.read_text(tmp_path / "l") == "Grüße, señor"


def _fortune_tree(root: Path) -> None:
    (root / "de").mkdir(parents=True)
    (root / "it").mkdir()
    (root / "es" / "off").mkdir(parents=True)
    (root / "computers").write_text("Bugs are features.\n%\nRTFM.\n%\n")
    (root / "computers.dat").write_bytes(b"\x00\x01binary index")
    (root / "computers.u8").symlink_to("computers")
    (root / "brasil").write_bytes("Não há de quê.\n%\nSaudade.\n".encode("latin-1"))
    (root / "de" / "sprueche").write_text("Übung macht den Meister.\n%\n")
    (root / "pl").mkdir()
    (root / "pl" / "pld").write_text("#pld\n<a> #pld rządzi\n%\n#pld-fork\n<b> cześć\n")
    (root / "it" / "adams").write_text("La risposta è 42.\n")
    (root / "adams").symlink_to("it/adams")  # the top level links into it/: not English
    (root / "es" / "refranes").write_text("Más vale tarde\nque nunca.\n")
    (root / "es" / "off" / "rude").write_text("Nested folders are skipped.\n")


def test_fortunes_languages_and_skipped_files(tmp_path):
    _fortune_tree(tmp_path)
    labels = bd.FORTUNE_LABELS
    got = sorted((text, labels[y]) for text, y in bd.load_fortunes(tmp_path))
    assert got == sorted([
        ("Bugs are features.", "english"),
        ("RTFM.", "english"),
        ("Não há de quê.", "portuguese"),
        ("Saudade.", "portuguese"),
        ("Übung macht den Meister.", "german"),
        ("<a> #pld rządzi", "polish"),
        ("#pld-fork\n<b> cześć", "polish"),
        ("La risposta è 42.", "italian"),
        ("Más vale tarde\nque nunca.", "spanish"),
    ])


WORDNET_NOUN = (
    "  1 This software and database is being provided to you, the LICENSEE, by  \n"
    "  2 Princeton University under the following license. | not a gloss\n"
    "00001740 03 n 01 entity 0 003 ~ 00001930 n 0000 | that which is perceived to exist\n"
    "00002137 03 n 02 abstraction 0 abstract_entity 0 010 | a general concept; \"an idea\"  \n"
)


def test_wordnet_gloss_skips_licence_lines():
    lines = WORDNET_NOUN.splitlines()
    assert [bd.wordnet_gloss(line) for line in lines] == [
        None, None, "that which is perceived to exist", 'a general concept; "an idea"',
    ]


def test_load_wordnet_labels_by_file(tmp_path):
    (tmp_path / "data.noun").write_text(WORDNET_NOUN)
    (tmp_path / "data.verb").write_text("00001740 29 v 01 breathe 0 | draw air into the lungs\n")
    (tmp_path / "data.adj").write_text("00001740 00 a 01 able 0 | having the means\n")
    (tmp_path / "data.adv").write_text("00001740 02 r 01 quickly 0 | with speed\n")
    got = [(t, bd.WORDNET_LABELS[y]) for t, y in bd.load_wordnet(tmp_path)]
    assert got == [
        ("that which is perceived to exist", "noun"),
        ('a general concept; "an idea"', "noun"),
        ("draw air into the lungs", "verb"),
        ("having the means", "adjective"),
        ("with speed", "adverb"),
    ]


def test_load_tweets_latin1_csv(tmp_path):
    path = tmp_path / "tweets.csv"
    path.write_bytes(
        'sentiment,confidence,text\n'
        'positive,1,"Café, great!"\n'
        'negative,0.6,hate it\n'
        'mixed,0.5,unknown label is skipped\n'
        'neutral,,"two\nlines"\n'.encode("latin-1")
    )
    assert list(bd.load_tweets(path)) == [("Café, great!", 2), ("hate it", 0), ("two\nlines", 1)]


def test_load_bbc_title_and_body(tmp_path):
    for topic in bd.BBC_LABELS:
        (tmp_path / topic).mkdir()
    (tmp_path / "tech" / "001.txt").write_bytes("Chips get faster\n\nIntel said £1bn.\n".encode("latin-1"))
    assert list(bd.load_bbc(tmp_path)) == [
        ("Chips get faster. \nIntel said £1bn.", bd.BBC_LABELS.index("tech"))
    ]


def test_email_text_drops_headers_and_decodes_parts():
    plain = (
        "From: a@b.c\nReceived: from relay.example.org\nSubject: Lunch?\n"
        "Content-Type: text/plain; charset=utf-8\n\nÇa va? Noon at the café.\n"
    )
    text = bd.email_text(plain)
    assert text.startswith("Lunch?\n") and "Ça va? Noon at the café." in text
    assert "relay.example.org" not in text and "a@b.c" not in text

    body = base64.b64encode("<html><style>p{}</style><p>WIN &amp; save</p></html>".encode()).decode()
    html_only = (
        "Subject: =?utf-8?q?Gr=C3=BC=C3=9Fe?=\nMIME-Version: 1.0\n"
        'Content-Type: multipart/alternative; boundary="XX"\n\n--XX\n'
        "Content-Type: text/html; charset=utf-8\nContent-Transfer-Encoding: base64\n\n"
        f"{body}\n--XX--\n"
    )
    text = bd.email_text(html_only)
    assert text.startswith("Grüße\n")
    assert " ".join(text.split()) == "Grüße WIN & save"


def test_load_spam_labels_by_group(tmp_path):
    for group, body in [("easy-ham-1", "hello"), ("spam-2", "buy now")]:
        (tmp_path / group).mkdir()
        raw = f"Subject: {body}\n\n{body} body\n"
        (tmp_path / group / "00001.json").write_text(json.dumps({"text": raw}))
    assert [(" ".join(t.split()), y) for t, y in bd.load_spam(tmp_path)] == [
        ("hello hello body", 0), ("buy now buy now body", 1),
    ]


# --- cleaning, dedupe, splits -------------------------------------------------------------------


def test_clean_normalises_truncates_and_drops_letterless():
    assert bd.clean("  a\n\tb   c ", 100) == "a b c"
    assert bd.clean("alpha beta gamma", 12) == "alpha beta"
    assert bd.clean(" ()  -- 42 \n", 100) == ""


def test_dedupe_drops_repeats_empties_and_conflicts():
    rows = [("a  b", 0), ("a b", 0), ("", 1), ("   ", 1), ("x y", 0), ("x\ny", 1), ("z", 2)]
    assert bd.dedupe(rows, max_chars=100) == [("a b", 0), ("z", 2)]


@pytest.mark.parametrize("available,total,expected", [
    ([10, 10, 10], 9, [3, 3, 3]),
    ([10, 10, 10], 10, [4, 3, 3]),
    ([1, 100, 100], 9, [1, 4, 4]),
    ([1, 2, 100], 30, [1, 2, 27]),
    ([0, 5, 5], 4, [0, 2, 2]),
    ([3, 3], 50, [3, 3]),
])
def test_balanced_counts(available, total, expected):
    assert bd.balanced_counts(available, total) == expected


def _rows(per_class: list[int]) -> list[tuple[str, int]]:
    return [(f"text {y} {i}", y) for y, n in enumerate(per_class) for i in range(n)]


def test_make_splits_disjoint_capped_balanced():
    rows = _rows([1000, 60, 300])  # very unbalanced source
    sizes = {"train": 90, "validation": 15, "test": 30}
    splits = bd.make_splits(rows, 3, sizes, random.Random(0))
    assert {s: len(v) for s, v in splits.items()} == sizes
    for split, n in sizes.items():
        counts = [sum(1 for _, y in splits[split] if y == c) for c in range(3)]
        assert counts == [n // 3] * 3
    texts = [t for split in splits.values() for t, _ in split]
    assert len(texts) == len(set(texts))
    labels = [y for _, y in splits["train"]]
    assert labels != sorted(labels)  # shuffled, not grouped by class


def test_make_splits_small_source_fills_eval_first():
    splits = bd.make_splits(_rows([20, 20]), 2, {"train": 100, "validation": 10, "test": 10},
                            random.Random(0))
    assert [len(splits[s]) for s in ("train", "validation", "test")] == [20, 10, 10]


def test_make_splits_short_class_leaves_room_to_the_others():
    splits = bd.make_splits(_rows([20, 60]), 2, {"train": 40, "validation": 10, "test": 10},
                            random.Random(0))
    train = [y for _, y in splits["train"]]
    assert (train.count(0), train.count(1)) == (10, 30)


def _build(out: Path, fixtures: Path, seed: int) -> None:
    args = ["--out", str(out), "--tasks", "fortunes_language", "wordnet_pos", "--seed", str(seed),
            "--fortunes-dir", str(fixtures / "fortunes"), "--wordnet-dir", str(fixtures / "wn"),
            "--train", "4", "--validation", "2", "--test", "2"]
    assert bd.main(args) == 0


def test_build_is_byte_identical_for_a_seed(tmp_path):
    fixtures = tmp_path / "src"
    _fortune_tree(fixtures / "fortunes")
    for i in range(30):
        (fixtures / "fortunes" / "de" / "sprueche").open("a").write(f"Spruch {i}\n%\n")
        (fixtures / "fortunes" / "computers").open("a").write(f"Saying {i}\n%\n")
    (fixtures / "wn").mkdir()
    for name in bd.WORDNET_FILES:
        lines = "".join(f"0000{i} 00 x 01 w 0 | {name} gloss {i}\n" for i in range(10))
        (fixtures / "wn" / name).write_text(WORDNET_NOUN + lines)

    _build(tmp_path / "a", fixtures, seed=1)
    _build(tmp_path / "b", fixtures, seed=1)
    _build(tmp_path / "c", fixtures, seed=2)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert len(files) == 8
    for f in files:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()
    assert any((tmp_path / "a" / f).read_bytes() != (tmp_path / "c" / f).read_bytes() for f in files)

    task = tmp_path / "a" / "wordnet_pos"
    assert json.loads((task / "labels.json").read_text()) == bd.WORDNET_LABELS
    train = [json.loads(line) for line in (task / "train.jsonl").read_text().splitlines()]
    assert len(train) == 4 and sorted(r["label"] for r in train) == [0, 1, 2, 3]
    assert all(set(r) == {"text", "label"} for r in train)


def test_missing_required_source_fails(tmp_path):
    args = ["--out", str(tmp_path / "o"), "--tasks", "wordnet_pos", "--wordnet-dir",
            str(tmp_path / "nowhere")]
    assert bd.main(args) == 1


# --- fine-tuning --------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models gain nothing from threads, and on a busy 2-core runner two OpenMP threads
    made these steps 15-50x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_tensor_batches_shuffle_per_epoch_and_trim_padding():
    mask = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 0], [1, 0, 0, 0]])
    features = {"input_ids": torch.arange(16).view(4, 4) * mask, "attention_mask": mask,
                "labels": torch.arange(4)}
    factory = tensor_batches(features, 2, seed=3)
    epoch0, again, epoch1 = list(factory(0)), list(factory(0)), list(factory(1))
    assert [b["labels"].tolist() for b in epoch0] == [b["labels"].tolist() for b in again]
    assert sorted(y for b in epoch0 for y in b["labels"].tolist()) == [0, 1, 2, 3]
    assert [b["labels"].tolist() for b in epoch0] != [b["labels"].tolist() for b in epoch1]
    for batch in epoch0 + epoch1:
        rows = batch["labels"]
        width = int(mask[rows].sum(1).max())
        assert batch["input_ids"].shape == batch["attention_mask"].shape == (2, width)
        assert torch.equal(batch["input_ids"], features["input_ids"][rows, :width])


def _tiny_model(seed: int = 0, num_labels: int = 2):
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=16, num_labels=num_labels)
    torch.manual_seed(seed)
    return BertForSequenceClassification(config)


def _synthetic(n: int = 256, length: int = 8, seed: int = 0) -> dict[str, torch.Tensor]:
    """Label = which of two marker tokens sits after [CLS]; the rest is noise."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 2, (n,), generator=g)
    ids = torch.randint(10, 100, (n, length), generator=g)
    ids[:, 0] = 1
    ids[:, 1] = 3 + labels
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
            "token_type_ids": torch.zeros_like(ids), "labels": labels}


def _train(seed: int, steps: int, progress=None):
    model = _tiny_model()
    log = finetune_classifier(model, tensor_batches(_synthetic(), 32, seed), steps=steps, lr=1e-2,
                              weight_decay=0.01, warmup=0.1, device="cpu",
                              progress=progress)
    return model, log


def test_finetune_lowers_the_loss():
    calls = []
    model, log = _train(0, 40, progress=lambda step, total, loss: calls.append((step, total)))
    losses = log["losses"]
    assert len(losses) == 40 and calls[0] == (1, 40) and calls[-1] == (40, 40)
    assert sum(losses[-5:]) / 5 < 0.2 * sum(losses[:5]) / 5
    assert log["train_accuracy"] > 0.9 and log["examples_seen"] == 40 * 32
    assert not model.training


def test_finetune_is_deterministic_for_a_seed():
    model_a, log_a = _train(0, 10)  # 10 steps of 32 cycle the 256 examples into a second epoch
    model_b, log_b = _train(0, 10)
    _, log_c = _train(1, 10)
    assert log_a["losses"] == log_b["losses"] != log_c["losses"]
    b = model_b.state_dict()
    assert all(torch.equal(v, b[k]) for k, v in model_a.state_dict().items())


def test_finetune_leaves_global_rng_alone():
    model = _tiny_model()
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    finetune_classifier(model, tensor_batches(_synthetic(), 32, 0), steps=2, lr=1e-3,
                        weight_decay=0.0, warmup=0.0, device="cpu")
    assert torch.equal(torch.rand(3), expected)


def test_finetune_rejects_bad_arguments():
    with pytest.raises(FmergeError, match="warmup"):
        finetune_classifier(_tiny_model(), tensor_batches(_synthetic(), 32, 0), steps=2, lr=1e-3,
                            weight_decay=0.0, warmup=5, device="cpu")
    with pytest.raises(FmergeError, match="no batches"):
        finetune_classifier(_tiny_model(), lambda epoch: [], steps=2, lr=1e-3,
                            weight_decay=0.0, warmup=0.0, device="cpu")


def test_fresh_classifier_seeded_head(tmp_path):
    from transformers import BertConfig, BertModel

    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=16)
    torch.manual_seed(0)
    BertModel(config).save_pretrained(tmp_path / "base")
    a = fresh_classifier(tmp_path / "base", num_labels=3, seed=7)
    b = fresh_classifier(tmp_path / "base", num_labels=3, seed=7)
    c = fresh_classifier(tmp_path / "base", num_labels=3, seed=8, num_hidden_layers=1)
    assert a.classifier.weight.shape == (3, 32)
    assert torch.equal(a.classifier.weight, b.classifier.weight)
    assert not torch.equal(a.classifier.weight, c.classifier.weight)
    assert c.config.num_hidden_layers == 1
    assert torch.equal(a.bert.embeddings.word_embeddings.weight,
                       c.bert.embeddings.word_embeddings.weight)
    with pytest.raises(FmergeError, match="config.json"):
        fresh_classifier(tmp_path / "missing", num_labels=2, seed=0)
