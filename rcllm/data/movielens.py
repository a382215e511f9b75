"""MovieLens: ml-100k as shipped in the recbole wheel (atomic files, tab-separated with typed
headers), and the GroupLens releases of ml-1m and ml-100k (found, or downloaded, by
:func:`find_ml1m`)."""

from __future__ import annotations

import re
import shutil
import tempfile
import urllib.request
import zipfile
from collections.abc import Callable, Collection
from pathlib import Path, PurePosixPath

from rcllm.assets import wheel_file
from rcllm.data.dataset import Dataset
from rcllm.data.formats import Interaction
from rcllm.data.jsonl import DataFormatError, Problems
from rcllm.files import fill_file, write_folder

_YEAR_SUFFIX = re.compile(r"\s*\((\d{4})\)\s*$")


def recbole_ml100k_dir() -> Path:
    """ml-100k as shipped in the recbole wheel (atomic files)."""
    return wheel_file("recbole", "dataset_example/ml-100k/ml-100k.item", "recbole==1.2.1", "ml-100k").parent


def _atomic_rows(path: Path):
    with path.open(encoding="utf-8") as f:
        header = [h.split(":")[0] for h in f.readline().rstrip("\n").split("\t")]
        for line_no, line in enumerate(f, start=2):
            values = line.rstrip("\n").split("\t")
            if len(values) != len(header):
                raise ValueError(f"{path}:{line_no}: expected {len(header)} tab-separated fields, got {len(values)}")
            yield line_no, dict(zip(header, values))


def load_ml100k_recbole(path: Path | None = None) -> Dataset:
    """Items (title, year, categories) and ratings (as interactions) of ml-100k."""
    path = path or recbole_ml100k_dir()
    items = {}
    for _, row in _atomic_rows(path / "ml-100k.item"):
        title = _YEAR_SUFFIX.sub("", row["movie_title"]).strip()
        item = {"id": row["item_id"], "title": title}
        if row.get("release_year", "").isdigit():
            item["year"] = int(row["release_year"])
        if row.get("class"):
            item["categories"] = row["class"].split()
        items[row["item_id"]] = item
    interactions = []
    for line_no, row in _atomic_rows(path / "ml-100k.inter"):
        if row["item_id"] not in items:
            raise ValueError(f"{path / 'ml-100k.inter'}:{line_no}: unknown item id {row['item_id']!r}")
        interactions.append((row["user_id"], row["item_id"], float(row["timestamp"])))
    return Dataset("ml-100k", items, interactions)


# --- GroupLens releases: '::' or '|' separated, ISO-8859-1 ------------------------------------

ML1M_URL = "https://files.grouplens.org/datasets/movielens/ml-1m.zip"
ML1M_FILES = ("ratings.dat", "movies.dat", "users.dat")
ML100K_FILES = ("u.data", "u.item")
# The order of the 19 genre flags of u.item, as listed in the release's u.genre.
ML100K_GENRES = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
    "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi",
    "Thriller", "War", "Western",
)  # fmt: skip
_DOWNLOAD_TIMEOUT_S = 10.0


def split_title(raw: str) -> tuple[str, int | None]:
    """``"Matrix, The (1999)"`` -> ``("Matrix, The", 1999)``; the article stays where GroupLens
    put it, since that is the title users and the catalog know."""
    match = _YEAR_SUFFIX.search(raw)
    if not match:
        return raw.strip(), None
    return raw[: match.start()].strip(), int(match.group(1))


def _lines(path: Path):
    """``(line number, line)`` of a GroupLens file, blank lines skipped."""
    with path.open(encoding="iso-8859-1", newline="") as f:
        for line_no, line in enumerate(f, start=1):
            line = line.rstrip("\r\n")
            if line.strip():
                yield line_no, line


def _require(folder: Path, files: tuple[str, ...], what: str) -> None:
    missing = [name for name in files if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{folder} is not a {what} folder: missing {', '.join(missing)}")


def _ratings(
    path: Path,
    sep: str,
    expected: str,
    what: str,
    items: Collection[str],
    unknown_item: str,
    users: Collection[str] | None = None,
    unknown_user: str = "",
) -> list[Interaction]:
    """The ``user, item, rating, timestamp`` lines (integers split by ``sep``) of a GroupLens
    ratings file as interactions, after checking all of it: each item must be in ``items`` and,
    when ``users`` is given, each user in ``users`` (``unknown_*`` name the id and where it is
    missing, ``{}`` standing for the id)."""
    problems = Problems(path)
    interactions = []
    for line_no, line in _lines(path):
        fields = line.split(sep)
        if len(fields) != 4 or not all(f.isdigit() for f in fields):
            problems.add(line_no, f"expected {expected} (integers)")
            continue
        user, item, _, ts = fields
        if item not in items:
            problems.add(line_no, "unknown " + unknown_item.format(item))
        elif users is not None and user not in users:
            problems.add(line_no, "unknown " + unknown_user.format(user))
        else:
            interactions.append((user, item, float(ts)))
    problems.raise_if_any(DataFormatError, what)
    return interactions


def load_ml1m(folder: Path | str) -> Dataset:
    """MovieLens-1M from its GroupLens files: every movie of ``movies.dat`` as an item (title,
    year, genres as categories), every rating of ``ratings.dat`` as an interaction. ``users.dat``
    is only validated (ratings must name its users)."""
    folder = Path(folder)
    _require(folder, ML1M_FILES, "MovieLens-1M")

    path = folder / "movies.dat"
    problems = Problems(path)
    items: dict[str, dict] = {}
    for line_no, line in _lines(path):
        fields = line.split("::")
        if len(fields) < 3:
            problems.add(line_no, "expected MovieID::Title (Year)::Genre1|Genre2")
            continue
        movie_id, raw_title, genres = fields[0], "::".join(fields[1:-1]), fields[-1]
        title, year = split_title(raw_title)
        if not movie_id.isdigit() or not title:
            problems.add(line_no, f"bad movie id {movie_id!r} or empty title")
            continue
        if movie_id in items:
            problems.add(line_no, f"duplicate movie id {movie_id}")
            continue
        item = {"id": movie_id, "title": title, "year": year}
        item["categories"] = [g for g in genres.split("|") if g and g != "(no genres listed)"]
        items[movie_id] = item
    problems.raise_if_any(DataFormatError, "movies file")

    path = folder / "users.dat"
    problems = Problems(path)
    users: set[str] = set()
    for line_no, line in _lines(path):
        fields = line.split("::")
        if len(fields) != 5 or not fields[0].isdigit():
            problems.add(line_no, "expected UserID::Gender::Age::Occupation::Zip-code")
            continue
        users.add(fields[0])
    problems.raise_if_any(DataFormatError, "users file")

    interactions = _ratings(
        folder / "ratings.dat", "::", "UserID::MovieID::Rating::Timestamp", "ratings file",
        items, "movie id {} (not in movies.dat)", users, "user id {} (not in users.dat)",
    )
    return Dataset("ml-1m", items, interactions)


def load_ml100k_grouplens(folder: Path | str) -> Dataset:
    """MovieLens-100k from its GroupLens files: ``u.item`` (``|``-separated: id, title, release
    date, video release date, URL, one 0/1 flag per genre) and ``u.data`` (tab-separated: user,
    item, rating, timestamp). Genre names come from ``u.genre`` when it is there."""
    folder = Path(folder)
    _require(folder, ML100K_FILES, "MovieLens-100k")
    genres = list(ML100K_GENRES)
    path = folder / "u.genre"
    if path.is_file():
        problems = Problems(path)
        named = {}
        for line_no, line in _lines(path):
            name, _, index = line.rpartition("|")
            if not name or not index.isdigit() or int(index) in named:
                problems.add(line_no, "expected Genre|index, each index once")
                continue
            named[int(index)] = name
        problems.raise_if_any(DataFormatError, "u.genre file")
        genres = [named[n] for n in sorted(named)]  # u.item's flag count is checked against these

    path = folder / "u.item"
    problems = Problems(path)
    items: dict[str, dict] = {}
    for line_no, line in _lines(path):
        fields = line.split("|")
        flags = fields[5:]
        if len(fields) != 5 + len(genres) or not fields[0].isdigit() or any(f not in ("0", "1") for f in flags):
            problems.add(line_no, f"expected id|title|release date|video release date|URL|{len(genres)} genre flags")
            continue
        title, year = split_title(fields[1])
        if year is None and fields[2][-4:].isdigit():  # release date like 01-Jan-1995
            year = int(fields[2][-4:])
        if not title or fields[0] in items:
            problems.add(line_no, "empty title" if not title else f"duplicate movie id {fields[0]}")
            continue
        categories = [name for name, flag in zip(genres, flags) if flag == "1"]
        items[fields[0]] = {"id": fields[0], "title": title, "year": year, "categories": categories}
    problems.raise_if_any(DataFormatError, "u.item file")

    interactions = _ratings(
        folder / "u.data", "\t", "user<TAB>item<TAB>rating<TAB>timestamp", "u.data file",
        items, "item id {} (not in u.item)",
    )
    return Dataset("ml-100k", items, interactions)


def find_ml1m(data_dir: Path | None = None, download: Callable[[str, Path], None] | None = None) -> Path:
    """The folder holding ``ratings.dat``, ``movies.dat`` and ``users.dat``: ``data_dir`` (or its
    ``ml-1m/`` subfolder), else ``user_cache_dir()/datasets/ml-1m``, else downloaded there from
    GroupLens. ``download(url, dest)`` fetches a URL into a file (urllib with a short timeout by
    default). Raises FileNotFoundError saying where to put the files when all of that fails."""
    from rcllm.engine.models import user_cache_dir  # imports torch: only when needed

    cache = user_cache_dir() / "datasets" / "ml-1m"
    places = ([Path(data_dir), Path(data_dir) / "ml-1m"] if data_dir is not None else []) + [cache]
    for place in places:
        if all((place / name).is_file() for name in ML1M_FILES):
            return place
    try:
        _fetch_ml1m(cache, download or _download)
    except (OSError, zipfile.BadZipFile) as e:
        where = [f"  {data_dir}  (the data folder given)"] if data_dir is not None else []
        where.append(f"  {cache}  (rcllm's cache; set RCLLM_CACHE_DIR to move it)")
        raise FileNotFoundError(
            "MovieLens-1M not found: put ratings.dat, movies.dat and users.dat in one of\n"
            + "\n".join(where)
            + f"\nThey are in {ML1M_URL} (unzip it there). "
            f"Downloading it automatically failed: {type(e).__name__}: {e}"
        ) from e
    return cache


def _download(url: str, dest: Path) -> None:
    with urllib.request.urlopen(url, timeout=_DOWNLOAD_TIMEOUT_S) as response, dest.open("wb") as f:
        shutil.copyfileobj(response, f)


def _fetch_ml1m(target: Path, download: Callable[[str, Path], None]) -> None:
    """Download the ml-1m zip and put its three files into ``target``, each whole or not at all
    (rcllm/files.py), so an interrupted download never leaves a half-written file where
    :func:`find_ml1m` looks."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".ml-1m-download-") as tmp:
        archive = Path(tmp) / "ml-1m.zip"
        download(ML1M_URL, archive)
        with zipfile.ZipFile(archive) as z:
            members = {PurePosixPath(n).name: n for n in z.namelist()}
            for name in ML1M_FILES:
                if name not in members:
                    raise zipfile.BadZipFile(f"{ML1M_URL} holds no {name}")

            def extract(name: str, dest: Path) -> None:
                with z.open(members[name]) as src, dest.open("wb") as dst:
                    shutil.copyfileobj(src, dst)

            def extract_all(folder: Path) -> None:
                for name in ML1M_FILES:
                    extract(name, folder / name)

            if not target.exists():
                write_folder(target, extract_all)
                return
            for name in ML1M_FILES:  # a partial folder (a file or two put there by hand) is completed
                if not (target / name).is_file():
                    fill_file(target / name, lambda tmp, name=name: extract(name, tmp))
