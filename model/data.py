"""Reading a dataset directory, validating it, id maps and the per-user split.

A dataset is a directory with
  interactions.csv  user_id,item_id[,timestamp]             (required, unless reviews.csv is given)
  items.csv         item_id,title[,description]             (optional: item text for the content LM and titles)
  reviews.csv       user_id,item_id,text[,timestamp,rating] (optional: review text for the content LM)

Rules (printed as a report when anything is dropped, so a user sees what happened to their data):
  - a missing column, an empty file or an empty id is an error naming the file and line;
  - duplicate (user, item) interactions are dropped, the first one kept;
  - with no interactions.csv, the reviewed (user, item) pairs are the interactions;
  - items.csv rows of items nobody interacted with, and reviews of pairs that are not
    interactions, are dropped;
  - rows of a user keep their file order, or timestamp order when interactions.csv has timestamps.

Split (Mult-VAE protocol): per user, a random val_fraction of the interactions (at least 1) for
validation, test_fraction (at least 1) for test, the rest for training. Users with fewer than
MIN_INTERACTIONS_TO_SPLIT interactions cannot give one of each, so all of theirs are training
interactions: they get tokens and are served, but are not evaluated.
"""

from __future__ import annotations

import csv
import hashlib
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

MIN_INTERACTIONS_TO_SPLIT = 3

# The id rule of the server (service/schemas.py states it in the API): ids are printable, none of
# these characters may appear in one. ASCII control characters and the space; DEL, the C1 controls
# and the no-break space; the soft hyphen; Unicode spaces and invisible format characters
# (zero-width, bidirectional marks and overrides, word joiners, BOM), which make ids that look alike
# but differ, or reorder log lines. Lone UTF-16 surrogates are refused too (Redis keys, being UTF-8,
# cannot hold them).
FORBIDDEN_ID_CHARACTERS = (r"\x00-\x20\x7f-\xa0\xad\u1680\u180e\u2000-\u200f\u2028-\u202f\u205f-\u206f"
                           r"\u3000\ufeff")
_FORBIDDEN = re.compile(f"[{FORBIDDEN_ID_CHARACTERS}\\ud800-\\udfff]")


def forbidden_id_character(value: str) -> re.Match | None:
    """The first character of an id that breaks the id rule, or None."""
    return _FORBIDDEN.search(value)


TRAIN, VAL, TEST = 0, 1, 2
PART_NAMES = {"train": TRAIN, "val": VAL, "test": TEST}


class DataError(ValueError):
    """The dataset cannot be used; the message says which file and what is wrong."""


def item_text(title: str, description: str | None) -> str:
    """An item's text as the content LM, the teacher and a live item's placement read it: title and description."""
    return f"{title}. {description}" if title and description else (title or description or "")


@dataclass
class Dataset:
    user_ids: list[str]  # user index -> external id
    item_ids: list[str]  # item index -> external id
    interactions: np.ndarray  # [n, 2] int64 (user index, item index), unique pairs, per-user order kept
    item_titles: list[str]  # "" where items.csv has no row
    item_texts: list[str]  # title and description, the content LM's item text ("" where none)
    reviews: dict[tuple[int, int], str]  # (user index, item index) -> review text
    report: list[str] = field(default_factory=list)  # what was dropped, one line each

    @property
    def n_users(self) -> int:
        return len(self.user_ids)

    @property
    def n_items(self) -> int:
        return len(self.item_ids)

    def fingerprint(self) -> str:
        """A hash of the interactions by external id: evaluation refuses data that differs from training's."""
        h = hashlib.sha256()
        for u, i in self.interactions:
            h.update(self.user_ids[u].encode())
            h.update(b"\t")
            h.update(self.item_ids[i].encode())
            h.update(b"\n")
        return h.hexdigest()


@dataclass
class Split:
    """Per-user train/validation/test item indices. Train items keep the data's order (oldest first)."""

    train: list[np.ndarray]
    val: list[np.ndarray]
    test: list[np.ndarray]

    def part(self, name: str) -> list[np.ndarray]:
        return {"train": self.train, "val": self.val, "test": self.test}[name]

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Flat (user, item, part) arrays: the form the checkpoint stores."""
        users, items, parts = [], [], []
        for part_id, per_user in ((TRAIN, self.train), (VAL, self.val), (TEST, self.test)):
            for u, its in enumerate(per_user):
                users.append(np.full(len(its), u, dtype=np.int64))
                items.append(np.asarray(its, dtype=np.int64))
                parts.append(np.full(len(its), part_id, dtype=np.int64))
        return {
            "user": np.concatenate(users),
            "item": np.concatenate(items),
            "part": np.concatenate(parts),
        }

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], n_users: int) -> Split:
        user, item, part = arrays["user"], arrays["item"], arrays["part"]
        per_part = []
        for part_id in (TRAIN, VAL, TEST):
            sel = part == part_id
            per_user = [[] for _ in range(n_users)]
            for u, i in zip(user[sel].tolist(), item[sel].tolist()):
                per_user[u].append(i)
            per_part.append([np.asarray(x, dtype=np.int64) for x in per_user])
        return cls(*per_part)

    def train_reviews(self, dataset: Dataset) -> dict[tuple[int, int], str]:
        """Reviews of training pairs only: validation/test review text must never reach training."""
        train_pairs = {(u, int(i)) for u, its in enumerate(self.train) for i in its}
        return {pair: text for pair, text in dataset.reviews.items() if pair in train_pairs}


def _read_csv(path: Path, required: tuple[str, ...]) -> tuple[list[str], list[list[str]]]:
    csv.field_size_limit(sys.maxsize)
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if header is None:
                raise DataError(f"{path}: the file is empty (expected a header with {', '.join(required)})")
            header = [h.strip() for h in header]
            missing = [c for c in required if c not in header]
            if missing:
                raise DataError(
                    f"{path}: missing column(s) {', '.join(missing)}; the header has {', '.join(header)}"
                )
            rows = list(reader)
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e})") from e
    except csv.Error as e:
        raise DataError(f"{path}: malformed CSV ({e})") from e
    if not rows:
        raise DataError(f"{path}: no data rows after the header")
    return header, rows


def _columns(path: Path, header: list[str], rows: list[list[str]], names: tuple[str, ...]) -> list[list[str]]:
    """The named columns of every row; a short row or an empty id is an error with its line number."""
    idx = [header.index(n) for n in names]
    out = []
    for line, row in enumerate(rows, start=2):
        if not row:  # blank line
            continue
        if len(row) < len(header):
            raise DataError(f"{path}, line {line}: {len(row)} fields, the header has {len(header)}")
        out.append([row[i] for i in idx])
    return out


def _check_ids(path: Path, values: list[list[str]], id_columns: int) -> None:
    for line, row in enumerate(values, start=2):
        for name_idx in range(id_columns):
            if not row[name_idx].strip():
                raise DataError(f"{path}, line {line}: empty id")


def load_dataset(directory: str | Path) -> Dataset:
    directory = Path(directory)
    if not directory.is_dir():
        raise DataError(f"{directory}: no such dataset directory")
    interactions_path = directory / "interactions.csv"
    items_path = directory / "items.csv"
    reviews_path = directory / "reviews.csv"
    report: list[str] = []

    review_rows: list[list[str]] = []
    if reviews_path.exists():
        header, rows = _read_csv(reviews_path, ("user_id", "item_id", "text"))
        review_rows = _columns(reviews_path, header, rows, ("user_id", "item_id", "text"))
        _check_ids(reviews_path, review_rows, 2)

    if interactions_path.exists():
        header, rows = _read_csv(interactions_path, ("user_id", "item_id"))
        has_time = "timestamp" in header
        names = ("user_id", "item_id", "timestamp") if has_time else ("user_id", "item_id")
        pairs = _columns(interactions_path, header, rows, names)
        _check_ids(interactions_path, pairs, 2)
        if has_time:
            pairs = _sort_by_timestamp(interactions_path, pairs)
        source = interactions_path
    elif review_rows:
        pairs = [[u, i] for u, i, _ in review_rows]
        source = reviews_path
        report.append(f"{interactions_path.name} not found: the {len(pairs)} reviewed pairs are the interactions")
    else:
        raise DataError(f"{directory}: neither interactions.csv nor reviews.csv found")

    user_index: dict[str, int] = {}
    item_index: dict[str, int] = {}
    seen: set[tuple[int, int]] = set()
    interactions: list[tuple[int, int]] = []
    for row in pairs:
        u = user_index.setdefault(row[0].strip(), len(user_index))
        i = item_index.setdefault(row[1].strip(), len(item_index))
        if (u, i) not in seen:
            seen.add((u, i))
            interactions.append((u, i))
    if len(interactions) < len(pairs):
        report.append(f"{source.name}: dropped {len(pairs) - len(interactions)} duplicate (user, item) rows")
    for kind, ids in (("user", user_index), ("item", item_index)):
        unservable = [i for i in ids if forbidden_id_character(i)]
        if unservable:
            report.append(f"{source.name}: {len(unservable)} {kind} ids contain whitespace, control or invisible "
                          f"characters (first: {unservable[0]!r}); they are trained, but the server refuses such "
                          "ids in requests: rename them to serve them by id")
    # Group by user keeping each user's order: histories are read oldest-first by the server.
    interactions.sort(key=lambda p: p[0])

    titles = [""] * len(item_index)
    texts = [""] * len(item_index)
    if items_path.exists():
        header, rows = _read_csv(items_path, ("item_id", "title"))
        names = ("item_id", "title", "description") if "description" in header else ("item_id", "title")
        item_rows = _columns(items_path, header, rows, names)
        _check_ids(items_path, item_rows, 1)
        unknown = duplicates = 0
        described = set()
        for row in item_rows:
            i = item_index.get(row[0].strip())
            if i is None:
                unknown += 1
                continue
            if i in described:
                duplicates += 1
                continue
            described.add(i)
            title = " ".join(row[1].split())
            description = " ".join(row[2].split()) if len(row) > 2 else ""
            titles[i] = title
            texts[i] = item_text(title, description)
        if unknown:
            report.append(f"{items_path.name}: ignored {unknown} rows of items without interactions")
        if duplicates:
            report.append(f"{items_path.name}: ignored {duplicates} repeated item rows (first kept)")
        if len(described) < len(item_index):
            report.append(f"{items_path.name}: {len(item_index) - len(described)} interacted items have no row")

    reviews: dict[tuple[int, int], str] = {}
    if review_rows:
        dropped = duplicates = 0
        for u_id, i_id, text in review_rows:
            u, i = user_index.get(u_id.strip()), item_index.get(i_id.strip())
            if u is None or i is None or (u, i) not in seen:
                dropped += 1
                continue
            if (u, i) in reviews:
                duplicates += 1
                continue
            reviews[(u, i)] = " ".join(text.split())
        if dropped:
            report.append(f"{reviews_path.name}: dropped {dropped} reviews of unknown users, items or pairs")
        if duplicates:
            report.append(f"{reviews_path.name}: dropped {duplicates} repeated reviews of a pair (first kept)")

    return Dataset(
        user_ids=list(user_index),
        item_ids=list(item_index),
        interactions=np.asarray(interactions, dtype=np.int64).reshape(-1, 2),
        item_titles=titles,
        item_texts=texts,
        reviews=reviews,
        report=report,
    )


def _sort_by_timestamp(path: Path, rows: list[list[str]]) -> list[list[str]]:
    def key(item: tuple[int, list[str]]) -> float:
        line, row = item
        try:
            return float(row[2])
        except ValueError:
            raise DataError(f"{path}, line {line + 2}: timestamp {row[2]!r} is not a number") from None

    return [row for _, row in sorted(enumerate(rows), key=key)]


def split_dataset(dataset: Dataset, seed: int, val_fraction: float = 0.1, test_fraction: float = 0.1) -> Split:
    """Deterministic per-user random split. Each user's permutation is seeded by (seed, user index)."""
    if not (0 < val_fraction < 1 and 0 < test_fraction < 1 and val_fraction + test_fraction < 1):
        raise DataError(f"split fractions must be in (0, 1) and sum below 1: {val_fraction}, {test_fraction}")
    per_user: list[list[int]] = [[] for _ in range(dataset.n_users)]
    for u, i in dataset.interactions.tolist():
        per_user[u].append(i)
    train, val, test = [], [], []
    for u, items in enumerate(per_user):
        items_arr = np.asarray(items, dtype=np.int64)
        n = len(items)
        if n < MIN_INTERACTIONS_TO_SPLIT:
            train.append(items_arr)
            val.append(items_arr[:0])
            test.append(items_arr[:0])
            continue
        n_val = max(1, round(val_fraction * n))
        n_test = max(1, round(test_fraction * n))
        n_val = min(n_val, n - 2)  # keep at least one training and one test item
        n_test = min(n_test, n - n_val - 1)
        perm = np.random.default_rng([seed, u]).permutation(n)
        held = perm[: n_val + n_test]
        is_train = np.ones(n, dtype=bool)
        is_train[held] = False
        train.append(items_arr[is_train])  # original order: oldest first
        val.append(items_arr[np.sort(held[:n_val])])
        test.append(items_arr[np.sort(held[n_val:])])
    return Split(train, val, test)
