"""A small dataset with a planted structure, for the quickstart and the tests.

Items belong to categories and have titles such as "organic espresso beans"; each user likes one
or two categories and mostly picks items from them, popular ones more often. So a model that learns
users' tastes beats most-popular by a wide margin, and the titles and reviews carry the same signal
in words for the content LM.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

CATEGORIES = {
    "coffee": ["espresso beans", "pour-over kettle", "milk frother", "burr grinder", "cold brew jar", "drip filter"],
    "running": ["trail shoes", "sports watch", "running socks", "hydration vest", "reflective jacket", "knee sleeve"],
    "garden": ["pruning shears", "tomato seeds", "watering can", "raised bed", "compost bin", "garden gloves"],
    "camera": ["prime lens", "tripod", "memory card", "camera bag", "lens filter", "flash unit"],
    "baking": ["bread flour", "stand mixer", "loaf pan", "pastry brush", "sourdough starter", "cooling rack"],
    "yoga": ["yoga mat", "cork block", "stretch strap", "meditation cushion", "yoga towel", "balance ball"],
    "guitar": ["guitar strings", "capo", "clip-on tuner", "guitar strap", "pick set", "practice amp"],
    "hiking": ["trekking poles", "day pack", "water filter", "headlamp", "rain shell", "trail map"],
}
ADJECTIVES = ["classic", "compact", "premium", "organic", "lightweight", "durable", "deluxe", "everyday"]
PRAISE = ["works great", "good value", "exactly as described", "solid quality", "would buy again", "a bit pricey"]


def write_synthetic_dataset(directory: str | Path, n_users: int = 400, n_items: int = 160, n_categories: int = 8,
                            min_items: int = 6, max_items: int = 16, seed: int = 0, reviews: bool = True) -> Path:
    """Write interactions.csv, items.csv (and reviews.csv) into directory; returns it."""
    rng = np.random.default_rng(seed)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    categories = list(CATEGORIES)[:n_categories]
    item_category = [i % len(categories) for i in range(n_items)]
    titles = []
    for i in range(n_items):
        category = categories[item_category[i]]
        noun = CATEGORIES[category][(i // len(categories)) % len(CATEGORIES[category])]
        adjective = ADJECTIVES[(i // (len(categories) * len(CATEGORIES[category]))) % len(ADJECTIVES)]
        titles.append(f"{adjective} {noun}")
    # Popularity within a category falls off like Zipf, so most-popular is a real baseline.
    popularity = 1.0 / (1.0 + np.arange(n_items) // len(categories))
    rows, review_rows = [], []
    for u in range(n_users):
        liked = rng.choice(len(categories), size=rng.integers(1, 3), replace=False)
        in_taste = np.isin(item_category, liked)
        weights = popularity * np.where(in_taste, 1.0, 0.03)
        n = int(rng.integers(min_items, max_items + 1))
        chosen = rng.choice(n_items, size=min(n, int(in_taste.sum())), replace=False, p=weights / weights.sum())
        for t, i in enumerate(chosen):
            rows.append((f"u{u}", f"i{i}", 1_700_000_000 + 3600 * t))
            category = categories[item_category[i]]
            review_rows.append((f"u{u}", f"i{i}", 1_700_000_000 + 3600 * t, 5,
                                f"I use this {titles[i]} for {category}. {PRAISE[rng.integers(len(PRAISE))]}."))
    with (directory / "interactions.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["user_id", "item_id", "timestamp"])
        w.writerows(rows)
    with (directory / "items.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["item_id", "title", "description"])
        w.writerows((f"i{i}", titles[i], f"A {titles[i]} for {categories[item_category[i]]}.") for i in range(n_items))
    if reviews:
        with (directory / "reviews.csv").open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["user_id", "item_id", "timestamp", "rating", "text"])
            w.writerows(review_rows)
    return directory
