"""The embedded demo dataset: a seeded synthetic multi-domain dataset that needs no download.

It is written in the released PMMRec raw layout, so the real readers and preparation run on it:

    root/demo.json                      what was generated and from which settings (written last)
    root/D/D_users.tsv                  user \\t item item item ...   (chronological, no header)
    root/D/D_items_texts.tsv            item \\t title               (no header)
    root/D/D_images/<item>.jpg          224x224 RGB JPEG
    root/D/D_items_latent.tsv           the hidden attributes, with a header (analysis and tests only)

Each item has three latent attributes whose meaning all domains share:
- category: the shape in the image AND a noun in the title (both modalities);
- style: the colour and texture of the shape (image only);
- brand: a made-up brand name (title only).
Users walk one Markov chain over categories and one over styles that every domain shares, and
most users keep to one brand. Only the surface differs per domain: nouns, brand names, filler
words, palette and background. So a model must read both modalities, and what it learns about
transitions on the source domains carries over to the target domains. A fraction of items
shows another category in the image than the title names (text/image disagreement).
docs/demo-dataset.md describes the design and what the dataset can and cannot show.
"""
from __future__ import annotations

import bisect
import colorsys
import itertools
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from pmmcache.config import to_dict
from pmmcache.errors import ConfigError, DataError

FORMAT_VERSION = 1
GENERATOR = "pmmcache.data.demo"

# Category index -> shape drawn in the image; the same in every domain.
SHAPES = ("circle", "triangle", "square", "pentagon", "star", "cross", "diamond", "hexagon")
# Style index -> texture of the shape; the colour comes from the domain's palette at that index.
TEXTURES = ("plain", "horizontal stripes", "vertical stripes", "dots", "checks", "diagonal stripes")
N_CATEGORIES = len(SHAPES)
N_STYLES = len(TEXTURES)
N_BRANDS = 6
MIN_TITLE_WORDS = 3
MAX_TITLE_WORDS = 12


@dataclass(frozen=True)
class DemoConfig:
    """Settings of the demo dataset. The defaults make a dataset that a 2-core CPU runs end to end
    (extract, pre-train, fine-tune, eval) in about ten minutes."""

    seed: int = 0
    n_source_domains: int = 2
    n_target_domains: int = 2
    source_items: int = 360  # items per source domain
    target_items: int = 300  # items per target domain
    source_users: int = 900  # users per source domain
    target_users: int = 600  # fewer users on targets, so that pre-training matters
    min_seq_len: int = 5  # >= 5 so that every user survives 5-core filtering
    max_seq_len: int = 25
    image_size: int = 224
    noise_fraction: float = 0.1  # items whose image shows another category than the title names
    brand_preference: float = 10.0  # weight multiplier of items of a user's favourite brand
    popularity_skew: float = 0.5  # sigma of the log-normal item popularity (clipped at 2 sigma)
    transition_noise: float = 0.25  # probability mass spread uniformly over all next states
    min_item_interactions: int = 5  # rarer items take over a few occurrences of same-state items
    jpeg_quality: int = 90

    def __post_init__(self) -> None:
        def fail(message: str) -> None:
            raise ConfigError(f"DemoConfig: {message}")

        if self.n_source_domains < 2 or self.n_target_domains < 2:
            fail("needs at least 2 source and 2 target domains")
        if self.n_source_domains + self.n_target_domains > len(THEMES):
            fail(f"at most {len(THEMES)} domains in all (one per built-in theme)")
        n_states = N_CATEGORIES * N_STYLES
        for name in ("source_items", "target_items"):
            if getattr(self, name) < n_states:
                fail(f"{name} must be >= {n_states} so every (category, style) pair has an item")
        for name in ("source_users", "target_users"):
            if getattr(self, name) < 1:
                fail(f"{name} must be >= 1")
        if not 1 <= self.min_seq_len <= self.max_seq_len:
            fail("needs 1 <= min_seq_len <= max_seq_len")
        if self.max_seq_len > min(self.source_items, self.target_items):
            fail("max_seq_len exceeds the number of items of a domain (items never repeat)")
        if self.image_size < 32:
            fail("image_size must be >= 32")
        if not 0.0 <= self.noise_fraction < 1.0:
            fail("noise_fraction must be in [0, 1)")
        if self.brand_preference < 1.0:
            fail("brand_preference must be >= 1")
        if self.popularity_skew < 0.0:
            fail("popularity_skew must be >= 0")
        if not 0.0 <= self.transition_noise <= 1.0:
            fail("transition_noise must be in [0, 1]")
        if self.min_item_interactions < 0:
            fail("min_item_interactions must be >= 0")
        if not 1 <= self.jpeg_quality <= 95:
            fail("jpeg_quality must be in [1, 95]")


@dataclass(frozen=True)
class DomainTheme:
    """The surface of one domain: its words and its look. Attribute meaning is shared by all."""

    name: str
    nouns: tuple[tuple[str, str], ...]  # per category, two synonyms
    brands: tuple[str, ...]  # per brand index
    fillers: tuple[str, ...]  # words that say nothing about any attribute
    # The shape's colour per style: six hues 60 degrees apart, turned by `hue_offset`, in the
    # domain's own order, saturation and brightness. Colours stay far apart within a domain, but
    # the same style has another colour in each domain (the texture is what all domains share).
    hue_offset: float  # degrees
    hue_order: tuple[int, ...]  # style index -> hue slot
    saturation: float
    value: float
    background: tuple[tuple[int, int, int], tuple[int, int, int]]  # top and bottom of a gradient
    ink: tuple[int, int, int]  # outline colour

    @property
    def palette(self) -> tuple[tuple[int, int, int], ...]:
        """RGB colour of each style."""
        colours = []
        for slot in self.hue_order:
            hue = ((self.hue_offset + 60.0 * slot) % 360.0) / 360.0
            r, g, b = colorsys.hsv_to_rgb(hue, self.saturation, self.value)
            colours.append((round(r * 255), round(g * 255), round(b * 255)))
        return tuple(colours)


THEMES: tuple[DomainTheme, ...] = (
    DomainTheme(
        name="kitchen",
        nouns=(("mug", "cup"), ("kettle", "teapot"), ("plate", "dish"), ("bowl", "basin"),
               ("whisk", "beater"), ("knife", "cleaver"), ("pan", "skillet"), ("jar", "canister")),
        brands=("Copperleaf", "Brightwell", "Ovenly", "Saltmarsh", "Kettleby", "Marlowe"),
        fillers=("for", "everyday", "cooking", "with", "handle", "set", "home", "chef", "classic",
                 "durable", "easy", "clean", "dishwasher", "safe", "size", "pack", "gift",
                 "premium", "essential", "family"),
        hue_offset=0.0, hue_order=(0, 1, 2, 3, 4, 5), saturation=0.75, value=0.85,
        background=((245, 240, 225), (215, 205, 185)),
        ink=(40, 30, 20),
    ),
    DomainTheme(
        name="garden",
        nouns=(("planter", "pot"), ("hose", "sprinkler"), ("rake", "hoe"), ("shovel", "spade"),
               ("lantern", "torch"), ("bench", "seat"), ("trellis", "arch"),
               ("birdhouse", "feeder")),
        brands=("Greenway", "Thornbury", "Mossfield", "Fernhill", "Bloomcraft", "Oakhurst"),
        fillers=("outdoor", "for", "yard", "patio", "weatherproof", "sturdy", "lawn", "season",
                 "with", "grip", "long", "lasting", "natural", "backyard", "care", "tool", "kit",
                 "lightweight", "rustic", "growing"),
        hue_offset=20.0, hue_order=(2, 0, 4, 1, 5, 3), saturation=0.6, value=0.75,
        background=((225, 240, 215), (170, 200, 160)),
        ink=(20, 50, 20),
    ),
    DomainTheme(
        name="toys",
        nouns=(("ball", "sphere"), ("puzzle", "jigsaw"), ("robot", "android"), ("doll", "figurine"),
               ("kite", "glider"), ("truck", "lorry"), ("blocks", "bricks"), ("drum", "tambourine")),
        brands=("Tinkerly", "Bouncewell", "Playvale", "Wobbleton", "Jollity", "Sprocketeer"),
        fillers=("kids", "fun", "for", "ages", "learning", "toy", "play", "creative", "gift",
                 "with", "bright", "safe", "soft", "game", "party", "educational", "toddler",
                 "adventure", "mini", "deluxe"),
        hue_offset=10.0, hue_order=(4, 2, 0, 5, 3, 1), saturation=0.9, value=0.95,
        background=((235, 235, 250), (190, 190, 230)),
        ink=(30, 30, 70),
    ),
    DomainTheme(
        name="office",
        nouns=(("stapler", "clipper"), ("notebook", "journal"), ("pen", "marker"),
               ("folder", "binder"), ("lamp", "light"), ("chair", "stool"),
               ("calendar", "planner"), ("tray", "organizer")),
        brands=("Inkwell", "Ledgerly", "Paperloft", "Clerkson", "Deskwise", "Quillmore"),
        fillers=("desk", "work", "for", "professional", "with", "business", "study", "compact",
                 "refill", "school", "daily", "supplies", "organizing", "sleek", "modern",
                 "meeting", "ergonomic", "standard", "portable", "quality"),
        hue_offset=35.0, hue_order=(1, 3, 5, 0, 2, 4), saturation=0.8, value=0.75,
        background=((240, 240, 240), (200, 205, 215)),
        ink=(10, 10, 10),
    ),
    DomainTheme(
        name="sports",
        nouns=(("racket", "bat"), ("helmet", "headgear"), ("glove", "mitt"), ("bottle", "flask"),
               ("shoe", "sneaker"), ("mat", "pad"), ("bag", "duffel"), ("rope", "cord")),
        brands=("Fleetfoot", "Sprintvale", "Ironpeak", "Goalward", "Trailbound", "Pacewell"),
        fillers=("training", "for", "gym", "fitness", "pro", "with", "team", "match", "outdoor",
                 "breathable", "performance", "workout", "league", "endurance", "grip", "speed",
                 "official", "athletic", "practice", "club"),
        hue_offset=5.0, hue_order=(5, 4, 3, 2, 1, 0), saturation=0.85, value=0.8,
        background=((215, 230, 240), (150, 175, 195)),
        ink=(0, 0, 40),
    ),
    DomainTheme(
        name="pets",
        nouns=(("leash", "lead"), ("collar", "harness"), ("cushion", "mattress"),
               ("kennel", "crate"), ("scratcher", "post"), ("brush", "comb"), ("treats", "snacks"),
               ("carrier", "tote")),
        brands=("Pawsome", "Whiskerly", "Furbridge", "Barkley", "Tailwind", "Kibbleton"),
        fillers=("for", "dogs", "cats", "puppy", "kitten", "with", "comfort", "pet", "small",
                 "medium", "walks", "cozy", "grooming", "happy", "travel", "indoor", "gentle",
                 "everyday", "natural", "friend"),
        hue_offset=25.0, hue_order=(3, 5, 1, 4, 0, 2), saturation=0.7, value=0.85,
        background=((250, 235, 225), (220, 190, 175)),
        ink=(60, 30, 20),
    ),
)


# ---- latent structure shared by all domains -------------------------------------------------

@dataclass(frozen=True)
class LatentChains:
    """Next-attribute probabilities shared by every domain; rows sum to 1."""

    category: np.ndarray  # (N_CATEGORIES, N_CATEGORIES): P(next category | category)
    style: np.ndarray  # (N_STYLES, N_STYLES): P(next style | style)


def make_latent_chains(rng: np.random.Generator, transition_noise: float) -> LatentChains:
    """Categories follow a random cycle (mostly one step, sometimes two); styles mostly stay or
    move to the next style. Both chains are doubly stochastic, so in the long run every category
    and style is equally frequent, which keeps item popularity balanced enough for 5-core."""
    cycle = rng.permutation(N_CATEGORIES)
    position = np.empty(N_CATEGORIES, dtype=int)
    position[cycle] = np.arange(N_CATEGORIES)
    category = np.full((N_CATEGORIES, N_CATEGORIES), transition_noise / N_CATEGORIES)
    for c in range(N_CATEGORIES):
        one_step = cycle[(position[c] + 1) % N_CATEGORIES]
        two_steps = cycle[(position[c] + 2) % N_CATEGORIES]
        category[c, one_step] += (1.0 - transition_noise) * 0.65
        category[c, two_steps] += (1.0 - transition_noise) * 0.35
    style = np.full((N_STYLES, N_STYLES), transition_noise / N_STYLES)
    for s in range(N_STYLES):
        style[s, s] += (1.0 - transition_noise) * 0.6
        style[s, (s + 1) % N_STYLES] += (1.0 - transition_noise) * 0.4
    return LatentChains(category=category, style=style)


# ---- items of one domain --------------------------------------------------------------------

@dataclass(frozen=True)
class DomainItems:
    """Latent attributes of a domain's items, one entry per item index."""

    category: np.ndarray  # (N,) int
    style: np.ndarray  # (N,) int
    brand: np.ndarray  # (N,) int
    image_category: np.ndarray  # (N,) int; differs from `category` on noisy items
    popularity: np.ndarray  # (N,) float, mean 1

    def __len__(self) -> int:
        return len(self.category)


def make_items(rng: np.random.Generator, n_items: int, config: DemoConfig) -> DomainItems:
    """Attributes of `n_items` items: every (category, style) pair gets about the same number of
    items, brands are uniform, and a `noise_fraction` of items shows a wrong category in the image."""
    n_states = N_CATEGORIES * N_STYLES
    states = rng.permutation(np.resize(np.arange(n_states), n_items))
    category, style = states // N_STYLES, states % N_STYLES
    brand = rng.integers(0, N_BRANDS, size=n_items)
    image_category = category.copy()
    noisy = rng.random(n_items) < config.noise_fraction
    # A different category: add 1..K-1 modulo K.
    shift = rng.integers(1, N_CATEGORIES, size=n_items)
    image_category[noisy] = (category[noisy] + shift[noisy]) % N_CATEGORIES
    sigma = config.popularity_skew
    popularity = np.exp(np.clip(rng.normal(0.0, sigma, size=n_items), -2 * sigma, 2 * sigma))
    popularity /= popularity.mean()
    return DomainItems(category, style, brand, image_category, popularity)


def make_title(rng: np.random.Generator, theme: DomainTheme, category: int, brand: int) -> str:
    """'{Brand} {fillers} {noun} {fillers}', 3-12 words; the noun is one of two synonyms."""
    n_fillers = int(rng.integers(MIN_TITLE_WORDS - 2, MAX_TITLE_WORDS - 2 + 1))
    fillers = [theme.fillers[i] for i in rng.choice(len(theme.fillers), n_fillers, replace=False)]
    n_before = int(rng.integers(0, min(n_fillers, 3) + 1))
    noun = theme.nouns[category][int(rng.integers(0, 2))]
    words = [theme.brands[brand], *fillers[:n_before], noun, *fillers[n_before:]]
    return " ".join(words)


# ---- images ---------------------------------------------------------------------------------

def make_background(theme: DomainTheme, size: int) -> Image.Image:
    """The domain's vertical gradient from `background[0]` (top) to `background[1]` (bottom)."""
    top, bottom = (np.array(c, dtype=np.float32) for c in theme.background)
    t = np.linspace(0.0, 1.0, size, dtype=np.float32)[:, None, None]  # (H, 1, 1)
    rows = top * (1.0 - t) + bottom * t  # (H, 1, 3)
    pixels = np.broadcast_to(rows, (size, size, 3)).round().astype(np.uint8)
    return Image.fromarray(np.ascontiguousarray(pixels), mode="RGB")


def make_texture(colour: tuple[int, int, int], texture: str, size: int) -> Image.Image:
    """A full-size image of `colour` patterned with a darker shade of it."""
    yy, xx = np.mgrid[0:size, 0:size]
    period = max(size // 16, 4)
    if texture == "plain":
        shade = np.zeros((size, size), dtype=bool)
    elif texture == "horizontal stripes":
        shade = (yy // (period // 2)) % 2 == 1
    elif texture == "vertical stripes":
        shade = (xx // (period // 2)) % 2 == 1
    elif texture == "dots":
        dy, dx = yy % period - period / 2, xx % period - period / 2
        shade = dy * dy + dx * dx <= (period / 4) ** 2
    elif texture == "checks":
        shade = ((yy // period) + (xx // period)) % 2 == 1
    elif texture == "diagonal stripes":
        shade = ((xx + yy) // (period // 2)) % 2 == 1
    else:
        raise ValueError(f"unknown texture {texture!r}")
    base = np.array(colour, dtype=np.float32)
    dark = base * 0.65
    pixels = np.where(shade[:, :, None], dark, base).round().astype(np.uint8)  # (H, W, 3)
    return Image.fromarray(pixels, mode="RGB")


def shape_points(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    """Outline of `shape` centred on (cx, cy) with radius `r`, rotated by `angle` radians."""
    if shape in ("triangle", "square", "pentagon", "hexagon"):
        n = {"triangle": 3, "square": 4, "pentagon": 5, "hexagon": 6}[shape]
        # Squares start at 45 degrees so they stand on an edge, unlike the diamond.
        start = -np.pi / 2 + (np.pi / 4 if shape == "square" else 0.0)
        theta = start + 2 * np.pi * np.arange(n) / n
        radii = np.full(n, r)
    elif shape == "star":
        theta = -np.pi / 2 + np.pi * np.arange(10) / 5
        radii = np.where(np.arange(10) % 2 == 0, r, 0.45 * r)
    elif shape == "cross":
        w = 0.33 * r  # half-width of an arm
        xy = np.array([(-w, -r), (w, -r), (w, -w), (r, -w), (r, w), (w, w), (w, r), (-w, r),
                       (-w, w), (-r, w), (-r, -w), (-w, -w)])
        theta = np.arctan2(xy[:, 1], xy[:, 0])
        radii = np.hypot(xy[:, 0], xy[:, 1])
    elif shape == "diamond":
        xy = np.array([(0.0, -r), (0.6 * r, 0.0), (0.0, r), (-0.6 * r, 0.0)])
        theta = np.arctan2(xy[:, 1], xy[:, 0])
        radii = np.hypot(xy[:, 0], xy[:, 1])
    else:
        raise ValueError(f"no polygon for shape {shape!r}")
    theta = theta + angle
    return [(cx + rr * np.cos(t), cy + rr * np.sin(t)) for rr, t in zip(radii, theta)]


def render_image(
    rng: np.random.Generator,
    theme: DomainTheme,
    background: Image.Image,
    texture: Image.Image,
    shape: str,
) -> Image.Image:
    """One item image: `shape` filled with `texture` on the domain background, with a random
    position, size and tilt so that the same attributes never give identical pixels."""
    size = background.width
    cx, cy = size / 2 + rng.uniform(-0.12, 0.12, size=2) * size
    r = rng.uniform(0.26, 0.36) * size
    angle = rng.uniform(-np.pi / 12, np.pi / 12)
    mask = Image.new("L", (size, size), 0)
    canvas = background.copy()
    outline_width = max(size // 75, 1)
    if shape == "circle":
        box = (cx - r, cy - r, cx + r, cy + r)
        ImageDraw.Draw(mask).ellipse(box, fill=255)
        canvas.paste(texture, (0, 0), mask)
        ImageDraw.Draw(canvas).ellipse(box, outline=theme.ink, width=outline_width)
    else:
        points = shape_points(shape, float(cx), float(cy), float(r), float(angle))
        ImageDraw.Draw(mask).polygon(points, fill=255)
        canvas.paste(texture, (0, 0), mask)
        ImageDraw.Draw(canvas).polygon(points, outline=theme.ink, width=outline_width)
    return canvas


# ---- user sequences -------------------------------------------------------------------------

def make_sequences(
    rng: np.random.Generator,
    items: DomainItems,
    chains: LatentChains,
    n_users: int,
    config: DemoConfig,
) -> list[list[int]]:
    """Item-index sequences, one per user, chronological and without repeats.

    Each user has a favourite brand. From the current item's (category, style) the next pair is
    drawn from the shared chains, then an unused item of that pair, weighted by popularity and
    by `brand_preference` when it has the favourite brand (falling back to the category, then to
    any unused item, when the pair has none left)."""
    # Plain Python lists: the candidate sets are a handful of items, where numpy calls cost more
    # than they save.
    n_items = len(items)
    category, style = items.category.tolist(), items.style.tolist()
    by_state = {(c, s): [] for c in range(N_CATEGORIES) for s in range(N_STYLES)}
    for j in range(n_items):
        by_state[category[j], style[j]].append(j)
    by_category = [[j for j in range(n_items) if category[j] == c] for c in range(N_CATEGORIES)]
    everything = list(range(n_items))
    category_cdf = np.cumsum(chains.category, axis=1).tolist()
    style_cdf = np.cumsum(chains.style, axis=1).tolist()

    def draw(cdf: list[float], u: float) -> int:
        return min(bisect.bisect_right(cdf, u), len(cdf) - 1)

    def pick(candidates: list[int], used: set[int], weights: list[float], u: float) -> int | None:
        free = [j for j in candidates if j not in used]
        if not free:
            return None
        cumulative = list(itertools.accumulate(weights[j] for j in free))
        return free[min(bisect.bisect_right(cumulative, u * cumulative[-1]), len(free) - 1)]

    popularity = items.popularity.tolist()
    brand = items.brand.tolist()
    sequences = []
    for _ in range(n_users):
        favourite = int(rng.integers(0, N_BRANDS))
        weights = [p * (config.brand_preference if b == favourite else 1.0)
                   for p, b in zip(popularity, brand)]
        length = int(rng.integers(config.min_seq_len, config.max_seq_len + 1))
        uniforms = rng.random((length, 3)).tolist()  # next category, next style, item choice
        c, s = int(rng.integers(0, N_CATEGORIES)), int(rng.integers(0, N_STYLES))
        used: set[int] = set()
        sequence: list[int] = []
        for u_category, u_style, u_item in uniforms:
            if sequence:
                c = draw(category_cdf[category[sequence[-1]]], u_category)
                s = draw(style_cdf[style[sequence[-1]]], u_style)
            for candidates in (by_state[c, s], by_category[c], everything):
                item = pick(candidates, used, weights, u_item)
                if item is not None:
                    break
            used.add(item)
            sequence.append(item)
        sequences.append(sequence)
    return sequences


def raise_rare_items(
    rng: np.random.Generator,
    sequences: list[list[int]],
    items: DomainItems,
    min_count: int,
) -> None:
    """Give every item at least `min_count` occurrences, in place, so that 5-core filtering keeps
    the whole dataset. A rare item takes over occurrences of the most frequent item of the same
    (category, style), then of the same category, in sequences that do not hold it yet; the
    latent walk of every user stays the same (or keeps its category). Items stay rare only when
    the domain is too small to give them enough."""
    counts = np.bincount([j for seq in sequences for j in seq], minlength=len(items))
    for rare in np.flatnonzero(counts < min_count):
        same_state = np.flatnonzero((items.category == items.category[rare])
                                    & (items.style == items.style[rare]))
        same_category = np.flatnonzero(items.category == items.category[rare])
        for donors in (same_state, same_category):
            while counts[rare] < min_count:
                richer = donors[counts[donors] > min_count]
                if len(richer) == 0:
                    break
                donor = int(richer[np.argmax(counts[richer])])
                places = [(u, p) for u, seq in enumerate(sequences) if rare not in seq
                          for p, j in enumerate(seq) if j == donor]
                if not places:
                    counts[donor] = min_count  # no usable occurrence; never pick it again
                    continue
                u, p = places[int(rng.integers(0, len(places)))]
                sequences[u][p] = int(rare)
                counts[donor] -= 1
                counts[rare] += 1


# ---- writing --------------------------------------------------------------------------------

def write_domain(
    domain_dir: Path,
    theme: DomainTheme,
    role: str,
    n_items: int,
    n_users: int,
    chains: LatentChains,
    rng: np.random.Generator,
    config: DemoConfig,
) -> dict[str, Any]:
    """Generate and write one domain into `domain_dir`; returns its entry for demo.json."""
    name = theme.name
    items = make_items(rng, n_items, config)
    item_names = [f"{name}_i{j:04d}" for j in range(n_items)]
    titles = [make_title(rng, theme, int(items.category[j]), int(items.brand[j])) for j in range(n_items)]
    sequences = make_sequences(rng, items, chains, n_users, config)
    raise_rare_items(rng, sequences, items, config.min_item_interactions)

    domain_dir.mkdir()
    with open(domain_dir / f"{name}_items_texts.tsv", "w", encoding="utf-8", newline="\n") as f:
        for item, title in zip(item_names, titles):
            f.write(f"{item}\t{title}\n")
    with open(domain_dir / f"{name}_users.tsv", "w", encoding="utf-8", newline="\n") as f:
        for u, sequence in enumerate(sequences):
            f.write(f"{name}_u{u:04d}\t{' '.join(item_names[j] for j in sequence)}\n")
    with open(domain_dir / f"{name}_items_latent.tsv", "w", encoding="utf-8", newline="\n") as f:
        f.write("item\tcategory\tstyle\tbrand\timage_category\tpopularity\n")
        for j, item in enumerate(item_names):
            f.write(f"{item}\t{items.category[j]}\t{items.style[j]}\t{items.brand[j]}\t"
                    f"{items.image_category[j]}\t{items.popularity[j]:.4f}\n")

    image_dir = domain_dir / f"{name}_images"
    image_dir.mkdir()
    background = make_background(theme, config.image_size)
    textures = [make_texture(theme.palette[s], TEXTURES[s], config.image_size) for s in range(N_STYLES)]
    for j, item in enumerate(item_names):
        image = render_image(rng, theme, background, textures[int(items.style[j])],
                             SHAPES[int(items.image_category[j])])
        image.save(image_dir / f"{item}.jpg", format="JPEG", quality=config.jpeg_quality)

    return {
        "name": name,
        "role": role,
        "items": n_items,
        "users": n_users,
        "interactions": sum(len(s) for s in sequences),
        "category_nouns": [list(pair) for pair in theme.nouns],
        "brands": list(theme.brands),
        "palette": [list(colour) for colour in theme.palette],
    }


def generate_demo(root: Path, config: DemoConfig = DemoConfig()) -> dict[str, Any]:
    """Generate the demo dataset into `root` (which must not exist, or be empty); returns the
    content of root/demo.json.

    The dataset is built in a temporary sibling directory and moved into place with one
    `os.replace`, demo.json written last, so an interrupted run never leaves a half dataset at
    `root`. The same config gives byte-identical files (with the same Pillow/libjpeg)."""
    root = Path(root)
    if root.exists():
        if not root.is_dir() or any(root.iterdir()):
            raise DataError("already exists; delete it or pick another directory for the demo "
                            "dataset", path=root)
        root.rmdir()
    root.parent.mkdir(parents=True, exist_ok=True)
    building = Path(tempfile.mkdtemp(prefix=f".{root.name}.partial-", dir=root.parent))
    try:
        content = _write_dataset(building, config)
        os.chmod(building, 0o755)  # mkdtemp makes it private
        try:
            os.replace(building, root)
        except OSError:
            # Another process finished the same root first: keep its complete dataset.
            if (root / "demo.json").is_file():
                shutil.rmtree(building, ignore_errors=True)
                return json.loads((root / "demo.json").read_text(encoding="utf-8"))
            raise
    except BaseException:
        shutil.rmtree(building, ignore_errors=True)
        raise
    return content


def domain_names(config: DemoConfig) -> list[str]:
    """The domains `generate_demo(..., config)` writes, source domains first."""
    return [theme.name for theme in THEMES[: config.n_source_domains + config.n_target_domains]]


def _write_dataset(directory: Path, config: DemoConfig) -> dict[str, Any]:
    """Write every domain, then demo.json, into `directory`."""
    chains = make_latent_chains(np.random.default_rng([config.seed, 0]), config.transition_noise)
    roles = ["source"] * config.n_source_domains + ["target"] * config.n_target_domains
    domains = []
    for index, (theme, role) in enumerate(zip(THEMES, roles)):
        # One independent stream per domain: a domain's files do not depend on the others.
        rng = np.random.default_rng([config.seed, index + 1])
        n_items = config.source_items if role == "source" else config.target_items
        n_users = config.source_users if role == "source" else config.target_users
        domains.append(write_domain(directory / theme.name, theme, role, n_items, n_users,
                                    chains, rng, config))
    content = {
        "format": FORMAT_VERSION,
        "generator": GENERATOR,
        "config": to_dict(config),
        "domains": domains,
        "latent": {
            "shapes": list(SHAPES),
            "textures": list(TEXTURES),
            "category_transitions": np.round(chains.category, 6).tolist(),
            "style_transitions": np.round(chains.style, 6).tolist(),
        },
    }
    (directory / "demo.json").write_text(json.dumps(content, indent=2, sort_keys=True) + "\n",
                                       encoding="utf-8")
    return content
