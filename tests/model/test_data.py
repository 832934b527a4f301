"""Reading datasets: clear errors for bad files, documented filters with counts, a reproducible split."""

import numpy as np
import pytest

from model.data import DataError, load_dataset, split_dataset


def write(directory, name, text):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / name).write_text(text)
    return directory


def interactions(n_users=6, n_items=10, per_user=8):
    rows = ["user_id,item_id"]
    for u in range(n_users):
        rows += [f"u{u},i{(u + k) % n_items}" for k in range(per_user)]
    return "\n".join(rows) + "\n"


def test_reads_the_shared_format(tmp_path):
    d = write(tmp_path, "interactions.csv", "user_id,item_id,timestamp\nu1,a,20\nu1,b,10\nu2,a,5\n")
    write(d, "items.csv", 'item_id,title,description\na,Red  mug,"A mug, red"\nb,Tripod,\n')
    write(d, "reviews.csv", "user_id,item_id,timestamp,rating,text\nu1,a,20,5,great mug\n")
    data = load_dataset(d)
    assert data.user_ids == ["u2", "u1"]  # first appearance in timestamp order
    assert data.item_ids == ["a", "b"]
    u1 = data.user_ids.index("u1")
    assert [data.item_ids[i] for u, i in data.interactions if u == u1] == ["b", "a"]  # oldest first
    assert data.item_titles == ["Red mug", "Tripod"]
    assert data.item_texts == ["Red mug. A mug, red", "Tripod"]
    assert data.reviews == {(u1, 0): "great mug"}
    assert data.report == []


@pytest.mark.parametrize("name,text,message", [
    ("interactions.csv", "", "file is empty"),
    ("interactions.csv", "user_id,item_id\n", "no data rows"),
    ("interactions.csv", "user,item_id\nu1,a\n", "missing column(s) user_id"),
    ("interactions.csv", "user_id,item_id\nu1,\n", "line 2: empty id"),
    ("interactions.csv", "user_id,item_id,timestamp\nu1,a,yesterday\n", "is not a number"),
])
def test_bad_interactions_are_errors_naming_the_problem(tmp_path, name, text, message):
    write(tmp_path, name, text)
    with pytest.raises(DataError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_dataset(tmp_path)


def test_missing_directory_and_missing_files(tmp_path):
    with pytest.raises(DataError, match="no such dataset directory"):
        load_dataset(tmp_path / "nope")
    with pytest.raises(DataError, match="neither interactions.csv nor reviews.csv"):
        load_dataset(tmp_path)


def test_filters_are_counted_in_the_report(tmp_path):
    d = write(tmp_path, "interactions.csv", "user_id,item_id\nu1,a\nu1,a\nu2,b\n")
    write(d, "items.csv", "item_id,title\na,Mug\nzz,Ghost\n")
    write(d, "reviews.csv", "user_id,item_id,text\nu1,a,nice\nu1,b,never bought\nu9,a,stranger\n")
    data = load_dataset(d)
    assert len(data.interactions) == 2
    report = "\n".join(data.report)
    assert "dropped 1 duplicate" in report
    assert "ignored 1 rows of items without interactions" in report
    assert "1 interacted items have no row" in report
    assert "dropped 2 reviews of unknown users, items or pairs" in report


def test_ids_the_server_would_refuse_are_reported(tmp_path):
    d = write(tmp_path, "interactions.csv", "user_id,item_id\njohn smith,a\nu2,b\u200bc\nu2,a\n")
    data = load_dataset(d)
    assert data.user_ids == ["john smith", "u2"]  # trained all the same
    report = "\n".join(data.report)
    assert "1 user ids contain whitespace, control or invisible characters (first: 'john smith')" in report
    assert "1 item ids contain" in report and "'b\\u200bc'" in report


def test_reviews_alone_define_the_interactions(tmp_path):
    write(tmp_path, "reviews.csv", "user_id,item_id,text\nu1,a,nice\nu2,a,ok\n")
    data = load_dataset(tmp_path)
    assert len(data.interactions) == 2 and len(data.reviews) == 2


def test_split_is_deterministic_per_seed_and_holds_out_at_least_one(tmp_path):
    d = write(tmp_path, "interactions.csv", interactions(n_users=6, per_user=8) + "u99,i1\nu99,i2\n")
    data = load_dataset(d)
    a, b, c = split_dataset(data, seed=7), split_dataset(data, seed=7), split_dataset(data, seed=8)
    assert all(np.array_equal(x, y) for x, y in zip(a.test, b.test))
    assert any(not np.array_equal(x, y) for x, y in zip(a.test, c.test))
    for u in range(6):
        parts = [set(a.train[u].tolist()), set(a.val[u].tolist()), set(a.test[u].tolist())]
        assert [len(p) for p in parts] == [6, 1, 1]
        assert set.union(*parts) == {i for uu, i in data.interactions.tolist() if uu == u}
    short = data.user_ids.index("u99")  # fewer than 3 interactions: training only
    assert len(a.train[short]) == 2 and len(a.val[short]) == 0 and len(a.test[short]) == 0


def test_split_fractions_on_long_histories(tmp_path):
    d = write(tmp_path, "interactions.csv", interactions(n_users=2, n_items=100, per_user=50))
    split = split_dataset(load_dataset(d), seed=0)
    assert [len(split.train[0]), len(split.val[0]), len(split.test[0])] == [40, 5, 5]


def test_heldout_review_text_never_reaches_training(tmp_path):
    d = write(tmp_path, "interactions.csv", interactions(n_users=4, per_user=10))
    rows = ["user_id,item_id,text"] + [f"{u},{i},review of {u} {i}" for u, i in
                                       (line.split(",") for line in interactions(4, 10, 10).splitlines()[1:])]
    write(d, "reviews.csv", "\n".join(rows) + "\n")
    data = load_dataset(d)
    split = split_dataset(data, seed=0)
    train_reviews = split.train_reviews(data)
    heldout = {(u, int(i)) for u in range(4) for i in np.concatenate([split.val[u], split.test[u]])}
    assert train_reviews and not heldout & set(train_reviews)
    assert len(train_reviews) + len(heldout) == len(data.reviews)


def test_split_survives_the_checkpoint_array_form(tmp_path):
    from model.data import Split

    d = write(tmp_path, "interactions.csv", interactions())
    data = load_dataset(d)
    split = split_dataset(data, seed=3)
    back = Split.from_arrays(split.to_arrays(), data.n_users)
    for part in ("train", "val", "test"):
        assert all(np.array_equal(x, y) for x, y in zip(split.part(part), back.part(part)))
