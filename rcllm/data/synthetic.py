"""A generated dataset with a rule a recommender can learn, of any size, from a seed.

Items fall into clusters ("tastes"), one category each, and their titles and descriptions are
built from that category's own words, so an item's text tells its category. Popularity follows a
Zipf law. Every user has one or two favourite categories and mostly picks items from them, so the
next item usually shares a category with the history: a ranker that reads item text can beat
both the random and the popularity baseline, and one that can't is caught.
"""

from __future__ import annotations

import random
from itertools import accumulate

from rcllm.data.dataset import Dataset

# category -> (adjectives, nouns): the words an item's title and text are made of
THEMES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "Space Opera": (("Galactic", "Stellar", "Orbital", "Cosmic", "Interstellar", "Lunar"),
                    ("Starship", "Nebula", "Comet", "Empire", "Station", "Voyager")),
    "Detective": (("Silent", "Crooked", "Missing", "Shadowed", "Final", "Hidden"),
                  ("Witness", "Alibi", "Inspector", "Clue", "Verdict", "Suspect")),
    "Romance": (("Sweet", "Tender", "Secret", "Summer", "Endless", "Golden"),
                ("Kiss", "Heart", "Wedding", "Promise", "Letter", "Embrace")),
    "Western": (("Dusty", "Lonesome", "Wild", "Rusty", "Outlaw", "Desert"),
                ("Sheriff", "Saloon", "Canyon", "Rider", "Rifle", "Frontier")),
    "Cooking": (("Spicy", "Savory", "Rustic", "Crispy", "Smoky", "Zesty"),
                ("Kitchen", "Recipe", "Feast", "Bakery", "Chef", "Banquet")),
    "Horror": (("Haunted", "Cursed", "Bloody", "Wicked", "Grim", "Undead"),
               ("Crypt", "Ghost", "Ritual", "Nightmare", "Coffin", "Demon")),
    "Sports": (("Fast", "Winning", "Underdog", "Champion", "Rookie", "Victorious"),
               ("Stadium", "Season", "Goal", "Coach", "Playoff", "Marathon")),
    "Fantasy": (("Enchanted", "Ancient", "Mystic", "Elven", "Dragonborn", "Runic"),
                ("Wizard", "Dragon", "Kingdom", "Sword", "Quest", "Amulet")),
    "Jazz": (("Smooth", "Blue", "Midnight", "Swinging", "Cool", "Bebop"),
             ("Saxophone", "Trumpet", "Club", "Session", "Groove", "Ballad")),
    "Ocean": (("Deep", "Salty", "Stormy", "Coral", "Tidal", "Sunken"),
              ("Reef", "Voyage", "Lighthouse", "Harbor", "Whale", "Shipwreck")),
    "Robots": (("Mechanical", "Cyber", "Chrome", "Neural", "Synthetic", "Quantum"),
               ("Android", "Circuit", "Machine", "Automaton", "Drone", "Protocol")),
    "War": (("Iron", "Fallen", "Brave", "Frontline", "Burning", "Last"),
            ("Battalion", "Trench", "Siege", "General", "Battle", "Regiment")),
    "Comedy": (("Silly", "Goofy", "Awkward", "Zany", "Clumsy", "Cheeky"),
               ("Prank", "Mixup", "Roommate", "Blunder", "Joker", "Caper")),
    "Nature": (("Verdant", "Green", "Misty", "Alpine", "Blooming", "Rainy"),
               ("Forest", "Meadow", "River", "Mountain", "Glacier", "Valley")),
    "Heist": (("Perfect", "Daring", "Clever", "Masked", "Inside", "Double"),
              ("Vault", "Robbery", "Diamond", "Getaway", "Safecracker", "Score")),
    "Musical": (("Dancing", "Singing", "Broadway", "Melodic", "Jubilant", "Starlit"),
                ("Chorus", "Stage", "Overture", "Tango", "Encore", "Serenade")),
}  # fmt: skip

FAVOURITE_SHARE = 0.85  # how often a user picks from a favourite category rather than any
_EPOCH = 946_684_800  # 2000-01-01, where the generated timestamps start


def make_synthetic(
    n_items: int = 500,
    n_users: int = 300,
    n_interactions_per_user: tuple[int, int] = (20, 60),
    n_clusters: int = 8,
    zipf: float = 1.1,
    seed: int = 0,
) -> Dataset:
    """A :class:`Dataset` named ``synthetic`` with items ``"0"…`` and users ``"u0"…``; the same
    arguments always give the same dataset. Each user has between the two bounds of
    ``n_interactions_per_user`` distinct items (fewer only if the catalog is smaller)."""
    low, high = n_interactions_per_user
    if not 1 <= n_clusters <= len(THEMES):
        raise ValueError(f"n_clusters must be between 1 and {len(THEMES)} (the themes with word lists)")
    if n_items < n_clusters or n_users < 1 or not 1 <= low <= high:
        raise ValueError("need n_items >= n_clusters, n_users >= 1 and 1 <= low <= high interactions per user")
    rng = random.Random(seed)
    themes = list(THEMES)[:n_clusters]

    items: dict[str, dict] = {}
    cluster_items: list[list[str]] = [[] for _ in themes]
    titles: set[str] = set()
    for n in range(n_items):
        cluster = n % n_clusters
        adjectives, nouns = THEMES[themes[cluster]]
        title = f"The {rng.choice(adjectives)} {rng.choice(nouns)}"
        sequel = 2
        base = title
        while title in titles:
            title, sequel = f"{base} {sequel}", sequel + 1
        titles.add(title)
        text = f"A {themes[cluster].lower()} story of {rng.choice(nouns).lower()} and {rng.choice(nouns).lower()}."
        item_id = str(n)
        items[item_id] = {
            "id": item_id,
            "title": title,
            "year": rng.randint(1960, 2024),
            "categories": [themes[cluster]],
            "text": text,
        }
        cluster_items[cluster].append(item_id)

    # Zipf popularity over a random ranking of the items, used inside every category too
    ranked = list(items)
    rng.shuffle(ranked)
    weight = {item: 1.0 / (rank + 1) ** zipf for rank, item in enumerate(ranked)}

    draws = [(ids, list(accumulate(weight[i] for i in ids))) for ids in cluster_items + [ranked]]
    interactions = []
    for u in range(n_users):
        user = f"u{u}"
        favourites = rng.sample(range(n_clusters), k=min(rng.choice((1, 2)), n_clusters))
        seen: set[str] = set()
        ts = _EPOCH + rng.randrange(365 * 86_400)
        for _ in range(min(rng.randint(low, high), n_items)):
            order = rng.sample(favourites, len(favourites)) if rng.random() < FAVOURITE_SHARE else []
            # the favourites in random order, then any category (a sampled "anything" step, or
            # the favourites are used up)
            for ids, cum in [draws[c] for c in order] + [draws[-1]]:
                item = _draw(rng, ids, cum, seen, weight)
                if item is not None:
                    break
            seen.add(item)
            ts += rng.randint(60, 3 * 86_400)
            interactions.append((user, item, float(ts)))
    return Dataset("synthetic", items, interactions)


def _draw(
    rng: random.Random, ids: list[str], cum: list[float], seen: set[str], weight: dict[str, float]
) -> str | None:
    """A popularity-weighted item of ``ids`` not in ``seen``, or None when all are seen."""
    for _ in range(16):  # rejection is cheap while few are seen, which is the common case
        item = rng.choices(ids, cum_weights=cum, k=1)[0]
        if item not in seen:
            return item
    pool = [i for i in ids if i not in seen]
    return rng.choices(pool, weights=[weight[i] for i in pool], k=1)[0] if pool else None
