"""Soft+hard prompts: the one place where token id sequences are built, for training and serving alike.

The extended vocabulary puts one atomic token per user and per item after the backbone's word
tokens: with N word ids (the rows of the backbone's input embedding), I users and J items,
    user u  -> N + u
    item j  -> N + I + j
In text form a soft token is written <user_u> / <item_j> (internal indices), so any prompt can be
printed and parsed back (`TokenSpace.encode` / `TokenSpace.decode`). Soft tokens are never passed
through the word tokenizer, so none can be split into pieces.

Templates name their soft slots {user}, {item} and {history}; everything else is hard text.
Templates travel with the checkpoint, so a served model uses exactly the prompts it was trained with.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import lru_cache

SOFT_TOKEN = re.compile(r"<(user|item)_(\d+)>")
SLOT = re.compile(r"\{(user|item|history)\}")


@dataclass(frozen=True)
class PromptTemplates:
    collaborative: str = "{user} has interacted with"
    review: str = "{user} writes the following review for {item}:"
    item_text: str = "{item} is described as:"
    recommend: str = "{user} has interacted with {history}, {user} will interact with"
    # Users the model has no token for (new sign-ups): the same prompt with words in place of the
    # user token. Finetuning trains on it too (TrainConfig.anonymous_prompt_ratio), so it is a
    # prompt the model knows, not an improvisation at serving time.
    anonymous_recommend: str = "a user has interacted with {history}, the user will interact with"

    def to_dict(self) -> dict[str, str]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, str]) -> PromptTemplates:
        return cls(**d)


@dataclass
class Document:
    """A training document: context prompt and the homogeneous main text the loss is taken on."""

    prompt: list[int]
    main: list[int]
    users: list[int]  # user indices whose embeddings appear (for mutual regularization)
    items: list[int]  # item indices whose embeddings appear


class TokenSpace:
    """Maps users/items to extended-vocabulary ids and turns templates and text into id sequences."""

    def __init__(self, tokenizer, n_words: int, n_users: int, n_items: int, templates: PromptTemplates):
        self.tokenizer = tokenizer
        self.n_words = n_words
        self.n_users = n_users
        self.n_items = n_items
        self.templates = templates
        self._words = lru_cache(maxsize=4096)(self._tokenize_words)

    # --- ids -------------------------------------------------------------------------------
    def user_token(self, user: int) -> int:
        return self.n_words + user

    def item_token(self, item: int) -> int:
        return self.n_words + self.n_users + item

    def is_item_token(self, token: int) -> bool:
        return token >= self.n_words + self.n_users

    # --- text <-> ids ----------------------------------------------------------------------
    def _tokenize_words(self, text: str) -> tuple[int, ...]:
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if ids and max(ids) >= self.n_words:
            raise ValueError(f"tokenizer produced an id beyond the backbone's {self.n_words} word embeddings")
        return tuple(ids)

    def encode(self, text: str) -> list[int]:
        """Text with <user_u>/<item_j> markers -> ids. Whitespace between two soft tokens is not a token."""
        ids: list[int] = []
        pos = 0
        for m in SOFT_TOKEN.finditer(text):
            ids.extend(self._hard(text[pos : m.start()]))
            index = int(m.group(2))
            if m.group(1) == "user":
                if index >= self.n_users:
                    raise ValueError(f"<user_{index}> is beyond the {self.n_users} users")
                ids.append(self.user_token(index))
            else:
                if index >= self.n_items:
                    raise ValueError(f"<item_{index}> is beyond the {self.n_items} items")
                ids.append(self.item_token(index))
            pos = m.end()
        ids.extend(self._hard(text[pos:]))
        return ids

    def _hard(self, text: str) -> tuple[int, ...]:
        return () if not text.strip() else self._words(text)

    def decode(self, ids: Sequence[int]) -> str:
        out: list[str] = []
        words: list[int] = []

        def flush():
            if words:
                out.append(self.tokenizer.decode(words))
                words.clear()

        for t in ids:
            if t < self.n_words:
                words.append(t)
                continue
            flush()
            if out and not out[-1].endswith(" "):
                out.append(" ")
            if t < self.n_words + self.n_users:
                out.append(f"<user_{t - self.n_words}>")
            else:
                out.append(f"<item_{t - self.n_words - self.n_users}>")
        flush()
        return "".join(out)

    # --- templates ---------------------------------------------------------------------------
    def render(self, template: str, user: int | None = None, item: int | None = None,
               history: Sequence[int] = ()) -> list[int]:
        ids: list[int] = []
        pos = 0
        for m in SLOT.finditer(template):
            ids.extend(self._hard(template[pos : m.start()]))
            slot = m.group(1)
            if slot == "user":
                ids.append(self.user_token(user))
            elif slot == "item":
                ids.append(self.item_token(item))
            else:
                ids.extend(self.item_token(i) for i in history)
            pos = m.end()
        ids.extend(self._hard(template[pos:]))
        return ids


# --- the documents of each stage -------------------------------------------------------------

def build_collaborative_document(space: TokenSpace, user: int, items: Sequence[int]) -> Document:
    """`<user> has interacted with` -> items. Callers pass the items already shuffled (stochastic reordering)."""
    prompt = space.render(space.templates.collaborative, user=user)
    return Document(prompt, [space.item_token(i) for i in items], [user], list(items))


def build_content_documents(space: TokenSpace, reviews: dict[tuple[int, int], str], item_texts: Sequence[str],
                            max_tokens: int) -> list[Document]:
    """Review documents (`<user> writes the following review for <item>:` -> words) and item text
    documents (`<item> is described as:` -> words), main texts cut to max_tokens."""
    pairs = list(reviews)
    described = [i for i, text in enumerate(item_texts) if text]
    texts = [reviews[p] for p in pairs] + [item_texts[i] for i in described]
    if not texts:
        return []
    words = space.tokenizer(texts, add_special_tokens=False, truncation=True, max_length=max_tokens)["input_ids"]
    documents = []
    for (user, item), main in zip(pairs, words):
        prompt = space.render(space.templates.review, user=user, item=item)
        documents.append(Document(prompt, list(main), [user], [item]))
    for item, main in zip(described, words[len(pairs):]):
        prompt = space.render(space.templates.item_text, item=item)
        documents.append(Document(prompt, list(main), [], [item]))
    return [d for d in documents if d.main]


def build_recommend_prompt(space: TokenSpace, user: int | None, history: Sequence[int],
                           max_history: int) -> list[int]:
    """The recommendation prompt, for finetuning, evaluation and serving.

    `user` is None for a user without a token (anonymous template). Only the last `max_history`
    items of `history` are kept: the server passes histories oldest-first, so the most recent stay.
    """
    history = list(history)[-max_history:] if max_history > 0 else []
    if user is None:
        return space.render(space.templates.anonymous_recommend, history=history)
    return space.render(space.templates.recommend, user=user, history=history)


def longest_recommend_prompt(space: TokenSpace, max_history: int) -> int:
    """Tokens of the longest prompt build_recommend_prompt makes: a known or an anonymous user's with
    max_history items (each item one token)."""
    history = [0] * max_history
    return max(len(build_recommend_prompt(space, user, history, max_history)) for user in (0, None))
