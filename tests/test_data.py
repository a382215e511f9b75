"""Datasets: GroupLens and recbole MovieLens, synthetic, rcllm's own formats, splits, requests."""

from __future__ import annotations

import io
import json
import random
import re
import urllib.error
import urllib.request
import zipfile
from collections import Counter

import pytest

from rcllm.data.dataset import Dataset
from rcllm.data.formats import DataFormatError, load_histories, load_interactions, write_interactions
from rcllm.data.loaders import load_dataset, prepare
from rcllm.data.movielens import ML1M_URL, find_ml1m, load_ml1m, load_ml100k_grouplens, split_title
from rcllm.data.sampling import sample_requests
from rcllm.data.splits import time_split
from rcllm.data.synthetic import THEMES, make_synthetic

# --- GroupLens files, byte for byte in the release format ------------------------------------

ML1M_MOVIES = [
    "1::Toy Story (1995)::Animation|Children's|Comedy",
    "73::Misérables, Les (1995)::Drama|Musical",
    "29::City of Lost Children, The (Cité des enfants perdus, La) (1995)::Adventure|Sci-Fi",
    "2571::Matrix, The (1999)::Action|Sci-Fi|Thriller",
]
ML1M_USERS = ["1::F::1::10::48067", "2::M::56::16::70072"]
ML1M_RATINGS = [
    "1::2571::5::978300760",
    "1::1::3::978300700",  # earlier than the line above: sequences follow time, not file order
    "1::73::4::978302109",
    "2::1::4::978298413",
    "2::29::2::978299000",
]


def write_latin1(path, lines):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(("\n".join(lines) + "\n").encode("iso-8859-1"))
    return path


def write_ml1m(folder, movies=ML1M_MOVIES, users=ML1M_USERS, ratings=ML1M_RATINGS):
    write_latin1(folder / "movies.dat", movies)
    write_latin1(folder / "users.dat", users)
    write_latin1(folder / "ratings.dat", ratings)
    return folder


def ml1m_zip() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as z:
        for name, lines in (("movies.dat", ML1M_MOVIES), ("users.dat", ML1M_USERS), ("ratings.dat", ML1M_RATINGS)):
            z.writestr(f"ml-1m/{name}", ("\n".join(lines) + "\n").encode("iso-8859-1"))
        z.writestr("ml-1m/README", "MovieLens 1M")
    return buffer.getvalue()


def test_ml1m_grouplens_files_parse_with_latin1_titles_years_and_genres(tmp_path):
    folder = write_ml1m(tmp_path / "ml-1m")
    assert b"Mis\xe9rables" in (folder / "movies.dat").read_bytes()  # ISO-8859-1 on disk, as released
    data = load_ml1m(folder)
    assert data.name == "ml-1m"
    assert data.items["73"] == {
        "id": "73", "title": "Misérables, Les", "year": 1995, "categories": ["Drama", "Musical"]
    }  # fmt: skip
    assert data.items["2571"]["title"] == "Matrix, The"
    assert data.items["2571"]["year"] == 1999
    assert data.items["29"]["title"] == "City of Lost Children, The (Cité des enfants perdus, La)"
    assert data.items["1"]["categories"] == ["Animation", "Children's", "Comedy"]
    assert len(data.interactions) == 5
    assert data.user_sequences() == {"1": ["1", "2571", "73"], "2": ["1", "29"]}


def test_split_title_keeps_the_article_form():
    assert split_title("Matrix, The (1999)") == ("Matrix, The", 1999)
    assert split_title("Untitled") == ("Untitled", None)


def test_ml1m_bad_lines_are_reported_with_file_and_line(tmp_path):
    folder = write_ml1m(tmp_path, ratings=[*ML1M_RATINGS, "1::9999::5::978300760", "3::1::5::978300760", "1::1::5"])
    with pytest.raises(DataFormatError) as info:
        load_ml1m(folder)
    message = str(info.value)
    assert f"{folder / 'ratings.dat'}:6: unknown movie id 9999" in message
    assert f"{folder / 'ratings.dat'}:7: unknown user id 3" in message
    assert f"{folder / 'ratings.dat'}:8: expected UserID::MovieID::Rating::Timestamp" in message
    (folder / "users.dat").unlink()
    with pytest.raises(FileNotFoundError, match="users.dat"):
        load_ml1m(folder)


def test_find_ml1m_looks_in_the_data_dir_then_its_ml1m_folder_then_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RCLLM_CACHE_DIR", str(tmp_path / "cache"))

    def no_network(url, dest):
        raise AssertionError("must not download when the files are there")

    assert find_ml1m(write_ml1m(tmp_path / "a"), download=no_network) == tmp_path / "a"
    write_ml1m(tmp_path / "b" / "ml-1m")
    assert find_ml1m(tmp_path / "b", download=no_network) == tmp_path / "b" / "ml-1m"
    cached = write_ml1m(tmp_path / "cache" / "datasets" / "ml-1m")
    assert find_ml1m(tmp_path / "empty", download=no_network) == cached
    assert find_ml1m(None, download=no_network) == cached


def test_find_ml1m_offline_says_where_to_put_the_files_and_where_to_get_them(tmp_path, monkeypatch):
    monkeypatch.setenv("RCLLM_CACHE_DIR", str(tmp_path / "cache"))

    def offline(url, timeout=None):
        raise urllib.error.URLError("no network in this test")

    monkeypatch.setattr(urllib.request, "urlopen", offline)  # the default downloader's only way out
    with pytest.raises(FileNotFoundError) as info:
        find_ml1m(tmp_path / "data")
    message = str(info.value)
    for needed in ("ratings.dat", "movies.dat", "users.dat", ML1M_URL, "no network in this test"):
        assert needed in message
    assert str(tmp_path / "data") in message
    assert str(tmp_path / "cache" / "datasets" / "ml-1m") in message
    assert not (tmp_path / "cache" / "datasets" / "ml-1m").exists()
    assert list((tmp_path / "cache" / "datasets").iterdir()) == []  # no download leftovers


def test_find_ml1m_downloads_into_the_cache_and_extracts_the_three_files(tmp_path, monkeypatch):
    monkeypatch.setenv("RCLLM_CACHE_DIR", str(tmp_path / "cache"))
    urls = []

    def fake_download(url, dest):
        urls.append(url)
        dest.write_bytes(ml1m_zip())

    folder = find_ml1m(None, download=fake_download)
    assert urls == [ML1M_URL]
    assert folder == tmp_path / "cache" / "datasets" / "ml-1m"
    assert sorted(p.name for p in folder.iterdir()) == ["movies.dat", "ratings.dat", "users.dat"]
    assert [p.name for p in folder.parent.iterdir()] == ["ml-1m"]  # the zip and staging folder are gone
    assert load_dataset("ml-1m").items["73"]["title"] == "Misérables, Les"


def test_load_dataset_ml1m_reads_the_data_dir(tmp_path):
    data = load_dataset("ml-1m", data_dir=write_ml1m(tmp_path))
    assert len(data.items) == 4 and len(data.interactions) == 5


ML100K_ITEMS = [
    "1|Toy Story (1995)|01-Jan-1995||http://us.imdb.com/M/title-exact?Toy%20Story%20(1995)|0|0|0|1|1|1|0|0|0|0|0|0|0|0|0|0|0|0|0",
    "2|GoldenEye (1995)|01-Jan-1995||http://us.imdb.com/M/title-exact?GoldenEye%20(1995)|0|1|1|0|0|0|0|0|0|0|0|0|0|0|0|0|1|0|0",
    "1300|Nénette et Boni (1996)|20-Feb-1996||http://us.imdb.com/M/title-exact?N%E9nette%20et%20Boni%20(1996)|0|0|0|0|0|0|0|0|1|0|0|0|0|0|0|0|0|0|0",
    "267|unknown||||1|0|0|0|0|0|0|0|0|0|0|0|0|0|0|0|0|0|0",
]
ML100K_DATA = ["196\t1\t3\t881250949", "196\t2\t4\t881250000", "186\t1300\t1\t891717742"]
ML100K_GENRE_NAMES = ["unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
                      "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery",
                      "Romance", "Sci-Fi", "Thriller", "War", "Western"]  # fmt: skip


def test_ml100k_grouplens_files_parse(tmp_path):
    write_latin1(tmp_path / "u.item", ML100K_ITEMS)
    write_latin1(tmp_path / "u.data", ML100K_DATA)
    data = load_ml100k_grouplens(tmp_path)
    assert data.items["1"] == {
        "id": "1", "title": "Toy Story", "year": 1995, "categories": ["Animation", "Children's", "Comedy"]
    }  # fmt: skip
    assert data.items["2"]["categories"] == ["Action", "Adventure", "Thriller"]
    assert data.items["1300"]["title"] == "Nénette et Boni"
    assert data.items["267"] == {"id": "267", "title": "unknown", "year": None, "categories": ["unknown"]}
    assert data.user_sequences() == {"196": ["2", "1"], "186": ["1300"]}
    # u.genre, when present, names the flags (this one in a made-up language to prove it is read)
    write_latin1(tmp_path / "u.genre", [f"{name.upper()}|{n}" for n, name in enumerate(ML100K_GENRE_NAMES)] + [""])
    assert load_ml100k_grouplens(tmp_path).items["2"]["categories"] == ["ACTION", "ADVENTURE", "THRILLER"]
    assert load_dataset("ml-100k", data_dir=tmp_path).items["1300"]["title"] == "Nénette et Boni"


def test_ml100k_grouplens_bad_line_names_file_and_line(tmp_path):
    write_latin1(tmp_path / "u.item", [*ML100K_ITEMS, "5|Copycat (1995)|01-Jan-1995||url|0|1"])
    write_latin1(tmp_path / "u.data", ML100K_DATA)
    # re.escape: the expected format itself holds "|", which a regex would read as "or"
    where = re.escape(f"{tmp_path / 'u.item'}:5: expected id|title|release date|video release date|URL|19 genre flags")
    with pytest.raises(DataFormatError, match=f"(?m)^  {where}$"):
        load_ml100k_grouplens(tmp_path)


def test_recbole_ml100k_loads_in_full():
    data = load_dataset("ml-100k")
    assert (len(data.items), len(data.interactions), len(data.user_sequences())) == (1682, 100000, 943)


def test_load_dataset_rejects_unknown_names_listing_the_choices(tmp_path):
    with pytest.raises(ValueError, match="ml-1m, ml-100k, synthetic") as info:
        load_dataset("ml-20m")
    assert "catalog.jsonl" in str(info.value)
    with pytest.raises(ValueError, match="synthetic"):
        load_dataset("ml-100k", n_items=10)
    with pytest.raises(FileNotFoundError, match="catalog.jsonl"):
        load_dataset(str(tmp_path))


# --- synthetic ---------------------------------------------------------------------------------

SMALL = dict(n_items=120, n_users=80, n_interactions_per_user=(8, 20), n_clusters=6)


def test_synthetic_is_deterministic_for_a_seed():
    a, b, c = make_synthetic(**SMALL, seed=1), make_synthetic(**SMALL, seed=1), make_synthetic(**SMALL, seed=2)
    assert a.items == b.items and a.interactions == b.interactions
    assert a.interactions != c.interactions


def test_synthetic_shape_titles_and_timestamps():
    data = make_synthetic(**SMALL)
    assert len(data.items) == 120 and len(data.user_sequences()) == 80
    assert all(8 <= len(s) == len(set(s)) <= 20 for s in data.user_sequences().values())
    for item in data.items.values():
        (category,) = item["categories"]
        adjectives, nouns = THEMES[category]
        words = item["title"].split()
        assert words[1] in adjectives and words[2] in nouns  # the text carries the category
    last: dict[str, float] = {}
    for user, _, ts in data.interactions:
        assert ts > last.get(user, 0)
        last[user] = ts


def test_synthetic_next_item_follows_the_users_favourite_categories():
    data = make_synthetic(seed=3)
    split = time_split(data)
    category = {i: item["categories"][0] for i, item in data.items.items()}
    rng = random.Random(0)
    follows = by_chance = 0
    for user, positive in split.test.items():
        favourite = {c for c, _ in Counter(category[i] for i in split.test_history(user)).most_common(2)}
        follows += category[positive] in favourite
        by_chance += category[rng.choice(list(data.items))] in favourite
    n = len(split.test)
    assert follows / n > 0.7
    assert by_chance / n < 0.4


# --- rcllm's own formats -----------------------------------------------------------------------


def test_prepare_then_load_dataset_round_trips(tmp_path):
    data = make_synthetic(**SMALL)
    written = prepare(data, tmp_path / "prepared")
    assert sorted(written) == ["catalog.jsonl", "histories.jsonl", "interactions.jsonl"]
    assert sorted(p.name for p in (tmp_path / "prepared").iterdir()) == sorted(written)  # no temp files
    again = load_dataset(str(tmp_path / "prepared"))
    assert again.name == "prepared"
    assert again.items == data.items
    assert again.interactions == data.interactions
    histories, dropped = load_histories(written["histories.jsonl"], items=again.items)
    assert histories == data.user_sequences() and dropped == 0


def test_interactions_file_problems_are_reported_with_file_and_line(tmp_path):
    path = tmp_path / "interactions.jsonl"
    path.write_text(
        "\n".join(
            [
                '{"user_id": "1", "item_id": "a", "timestamp": 10, "rating": 5}',
                '{"user_id": 1, "item_id": "a", "timestamp": 10}',
                '{"user_id": "1", "item_id": "", "timestamp": 10}',
                '{"user_id": "1", "item_id": "a"}',
                '{"user_id": "1", "item_id": "a", "timestamp": "yesterday"}',
                '{"user_id": "1", "item_id": "a", "timestamp": 1',
                "",
                '"just a string"',
            ]
        )
    )
    with pytest.raises(DataFormatError) as info:
        load_interactions(path)
    message = str(info.value)
    assert "6 problems" in message
    for line, problem in [
        (2, "user_id must be a string"),
        (3, "item_id is empty"),
        (4, "missing timestamp"),
        (5, "timestamp must be a number"),
        (6, "malformed JSON"),
        (8, "expected a JSON object, got string"),
    ]:
        assert f"{path}:{line}: {problem}" in message
    assert f"{path}:1:" not in message


def test_unknown_items_in_interactions_fail_strictly_or_are_dropped_and_counted(tmp_path):
    rows = [("u", "a", 1.0), ("u", "zz", 2.0), ("v", "yy", 3.5), ("v", "b", 4.0)]
    path = write_interactions(rows, tmp_path / "i.jsonl")
    with pytest.raises(DataFormatError) as info:
        load_interactions(path, items={"a", "b"})
    assert f"{path}:2: unknown item id 'zz'" in str(info.value)
    assert f"{path}:3: unknown item id 'yy'" in str(info.value)
    assert "2 problems" in str(info.value)
    rows, dropped = load_interactions(path, items={"a", "b"}, strict=False)
    assert rows == [("u", "a", 1.0), ("v", "b", 4.0)] and dropped == 2
    assert '"timestamp": 1}' in path.read_text()  # whole-second timestamps are written as integers


def test_histories_file_validation(tmp_path):
    path = tmp_path / "histories.jsonl"
    path.write_text(
        "\n".join(
            [
                '{"user_id": "1", "history": ["a", "b"]}',
                '{"user_id": "2", "history": "a"}',
                '{"user_id": "1", "history": []}',
                '{"user_id": "3", "history": ["a", 7]}',
                '{"user_id": "4"}',
            ]
        )
    )
    with pytest.raises(DataFormatError) as info:
        load_histories(path)
    message = str(info.value)
    assert f"{path}:2: history must be a list of item ids" in message
    assert f"{path}:3: duplicate user_id '1' (first on line 1)" in message
    assert f"{path}:4: history[1] must be a non-empty string item id" in message
    assert f"{path}:5: missing history" in message
    good = tmp_path / "good.jsonl"
    good.write_text('{"user_id": "1", "history": ["a", "x", "b"]}\n{"user_id": "2", "history": ["y"]}\n')
    with pytest.raises(DataFormatError, match="good.jsonl:1: unknown item id 'x'"):
        load_histories(good, items={"a", "b"})
    assert load_histories(good, items={"a", "b"}, strict=False) == ({"1": ["a", "b"], "2": []}, 2)


# --- splits and requests -----------------------------------------------------------------------


def test_time_split_never_shows_validation_or_test_targets_to_training():
    data = Dataset(
        "tiny",
        {i: {"id": i, "title": i} for i in "abcdef"},
        [("u", "c", 3), ("u", "a", 1), ("u", "b", 2), ("u", "d", 4), ("short", "a", 1), ("short", "b", 2)],
    )
    split = time_split(data)
    assert split.train == {"u": ["a", "b"]} and split.validation == {"u": "c"} and split.test == {"u": "d"}
    assert split.dropped_users == 1
    assert split.test_history("u") == ["a", "b", "c"]
    with pytest.raises(ValueError):
        time_split(data, min_interactions=2)

    split = time_split(make_synthetic(**SMALL), min_interactions=10)
    assert split.dropped_users > 0
    for user, train in split.train.items():
        assert split.validation[user] not in train and split.test[user] not in train
        assert split.test[user] != split.validation[user]


def test_sample_requests_is_deterministic_for_a_seed():
    data = make_synthetic(**SMALL)
    a = sample_requests(data, 20, history=5, candidates=10, seed=7, requests_per_user=3)
    b = sample_requests(data, 20, history=5, candidates=10, seed=7, requests_per_user=3)
    c = sample_requests(data, 20, history=5, candidates=10, seed=8, requests_per_user=3)
    assert a == b
    assert a != c


def test_sample_requests_sends_r_interleaved_requests_per_user_with_fresh_unseen_negatives():
    data = make_synthetic(**SMALL)
    requests = sample_requests(data, 20, history=5, candidates=10, seed=0, requests_per_user=3)
    assert len(requests) == 60
    assert set(Counter(r.user_id for r in requests).values()) == {3}
    # interleaved: the stream is not 20 runs of one user's three requests
    runs = sum(1 for prev, nxt in zip(requests, requests[1:]) if prev.user_id != nxt.user_id) + 1
    assert runs > 30
    sequences = data.user_sequences()
    by_user: dict[str, list] = {}
    for r in requests:
        seq = sequences[r.user_id]
        assert r.positive == seq[-1] and r.history == seq[-6:-1]
        assert len(r.candidates) == len(set(r.candidates)) == 10 and r.positive in r.candidates
        negatives = set(r.candidates) - {r.positive}
        assert not negatives & set(seq)  # never an item the user interacted with, history or not
        by_user.setdefault(r.user_id, []).append(frozenset(negatives))
    assert sum(len(set(n)) > 1 for n in by_user.values()) == 20  # fresh negatives for each request
    one_each = sample_requests(data, 20, history=5, candidates=10, seed=0)
    assert len(one_each) == len({r.user_id for r in one_each}) == 20


def test_sample_requests_uniform_negatives_also_exclude_seen_items():
    data = make_synthetic(**SMALL)
    for r in sample_requests(data, 30, history=3, candidates=20, negatives="uniform", seed=1):
        assert not (set(r.candidates) - {r.positive}) & set(data.user_sequences()[r.user_id])


def test_written_files_are_plain_json_lines(tmp_path):
    written = prepare(make_synthetic(n_items=20, n_users=3, n_interactions_per_user=(3, 4), n_clusters=2), tmp_path)
    for path in written.values():
        lines = path.read_text(encoding="utf-8").splitlines()
        assert lines and all(isinstance(json.loads(line), dict) for line in lines)
