"""Loading a recommender bundle cannot reach outside it, `Recommender` is thread-safe, and a bare
string is never read as a list of ids (issue 22, items 5-10)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import stat
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import REPO

from common.errors import UserError
from common.io import sha256_file
from llmrec.bundle import BundleError, config_checksum
from llmrec.recommender import Recommender

FIXTURE = REPO / "tests" / "fixtures" / "bundle-0.1.0" / "bundle"


@pytest.fixture(scope="module")
def recommender() -> Recommender:
    return Recommender.from_pretrained(FIXTURE, device="cpu")


def edited(tmp_path: Path, edit: Callable[[dict], None]) -> Path:
    """A copy of the fixture bundle whose config.json ``edit`` changed, with a checksum that matches
    (anyone can recompute it: it detects accidents, not attacks)."""
    out = tmp_path / "bundle"
    shutil.copytree(FIXTURE, out)
    config = json.loads((out / "config.json").read_text())
    edit(config)
    config["checksum"] = config_checksum(config)
    (out / "config.json").write_text(json.dumps(config))
    return out


# ------------------------------------------------------------------------------------------- 5: no paths
def test_a_bundle_cannot_choose_the_backbone_cache_or_allow_downloads(tmp_path, caplog):
    evil = tmp_path / "evil-cache"

    def edit(config):
        config["backbone"]["config"].update(cache_dir=str(evil), allow_download=True)

    with caplog.at_level(logging.WARNING):
        loaded = Recommender.from_pretrained(edited(tmp_path, edit), device="cpu")
    assert loaded.model.backbone.cache_dir is None and loaded.model.backbone.allow_download is False
    assert "ignoring the bundle's backbone allow_download, cache_dir" in caplog.text
    assert not evil.exists()
    override = Recommender.from_pretrained(FIXTURE, device="cpu", cache_dir=str(tmp_path / "mine"))
    assert override.model.backbone.cache_dir == str(tmp_path / "mine")  # the caller's choice still counts


# ------------------------------------------------------------------------------------------- 6: files stay inside
@pytest.mark.parametrize("name", ["../outside.json", "{abs}", "adapter/../../outside.json"])
def test_listed_files_outside_the_bundle_are_refused(tmp_path, name):
    outside = tmp_path / "outside.json"
    outside.write_text("{}")
    name = name.format(abs=outside)
    record = {"bytes": outside.stat().st_size, "sha256": sha256_file(outside)}
    bundle = edited(tmp_path, lambda config: config["files"].update({name: record}))
    with pytest.raises(BundleError, match="not a relative path inside the directory"):
        Recommender.from_pretrained(bundle, device="cpu")


def test_a_link_that_leads_outside_the_bundle_is_refused(tmp_path):
    bundle = edited(tmp_path, lambda config: None)
    outside = tmp_path / "titles.json"
    shutil.copy(bundle / "items.json", outside)  # same bytes: size and sha256 would pass
    (bundle / "items.json").unlink()
    (bundle / "items.json").symlink_to(outside)
    with pytest.raises(BundleError, match="items.json: a link that leads outside"):
        Recommender.from_pretrained(bundle, device="cpu")
    (bundle / "items.json").unlink()
    shutil.copy(outside, bundle / "items.json")
    (bundle / "extra").symlink_to(tmp_path)  # even a link the config does not list
    with pytest.raises(BundleError, match="extra: a link that leads outside"):
        Recommender.from_pretrained(bundle, device="cpu")


def test_a_file_the_loader_opens_must_be_listed(tmp_path):
    bundle = edited(tmp_path, lambda config: config["files"].pop("histories.safetensors"))
    with pytest.raises(BundleError, match=r"does not list \['histories.safetensors'\]"):
        Recommender.from_pretrained(bundle, device="cpu")


# ------------------------------------------------------------------------------------------- 7: templates
@pytest.mark.parametrize(
    ("template", "error"),
    [
        ("<user_{user:>9999}> has interacted with {history}", "is not allowed"),
        ("<user_{user}> has interacted with {history!r}", "is not allowed"),
        ("<user_{user}> likes {history.__class__}", "is not allowed"),
        ("<user_{user}> likes {history[0]}", "is not allowed"),
        ("<user_{user}> likes {items} and {history}", "is not allowed"),
        ("<user_{user}> likes things", r"must contain \{history\}"),
        ("<user_{user}> likes {history", "not a format string"),
        (["not", "a", "string"], "must be a string"),
    ],
)
def test_templates_are_validated_at_load(tmp_path, template, error):
    bundle = edited(tmp_path, lambda config: config["templates"].update(user=template))
    with pytest.raises(BundleError, match=error):
        Recommender.from_pretrained(bundle, device="cpu")


def test_the_cold_template_may_not_name_the_user(tmp_path):
    bundle = edited(tmp_path, lambda config: config["templates"].update(cold="<user_{user}> {history}"))
    with pytest.raises(BundleError, match="cold template.*field \\{user\\} is not allowed"):
        Recommender.from_pretrained(bundle, device="cpu")


# ------------------------------------------------------------------------------------------- 8: umask
def test_bundle_files_follow_the_umask(recommender, tmp_path):
    old = os.umask(0o022)
    try:
        bundle = recommender.save_pretrained(tmp_path / "bundle")
    finally:
        os.umask(old)
    modes = {p.relative_to(bundle).as_posix(): stat.S_IMODE(p.stat().st_mode) for p in bundle.rglob("*")}
    assert {name: mode for name, mode in modes.items() if mode not in (0o644, 0o755)} == {}
    assert modes["config.json"] == 0o644 and modes["adapter"] == 0o755


# ------------------------------------------------------------------------------------------- 9: threads
def test_threads_on_a_fresh_instance_get_the_serial_scores(recommender, monkeypatch):
    users = recommender.catalogue.user_ids
    new_zeros = torch.Tensor.new_zeros

    def slow_new_zeros(self, *args, **kwargs):  # widen the window of lazy allocations (a slow machine)
        time.sleep(0.01)
        return new_zeros(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "new_zeros", slow_new_zeros)
    serial = Recommender(
        recommender.model, recommender.catalogue, recommender.histories, recommender.templates
    )
    expected = {user: serial.score(user) for user in users}
    for _ in range(3):
        fresh = Recommender(
            recommender.model, recommender.catalogue, recommender.histories, recommender.templates
        )
        barrier = threading.Barrier(len(users))
        results, errors = {}, []

        def first_call(user, fresh=fresh, barrier=barrier, results=results, errors=errors):
            try:
                barrier.wait()
                results[user] = fresh.score(user)
            except Exception as err:  # noqa: BLE001 - collected, asserted below
                errors.append(err)

        threads = [threading.Thread(target=first_call, args=(user,)) for user in users]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert errors == []
        for user in users:  # the first answers, and every later one (from the cached states)
            assert torch.allclose(results[user], expected[user], atol=1e-5), user
            assert torch.allclose(fresh.score(user), expected[user], atol=1e-5), user


def test_concurrent_updates_and_scores_stay_consistent(recommender):
    fresh = Recommender(
        recommender.model, recommender.catalogue, recommender.histories, recommender.templates
    )
    serial = Recommender(
        recommender.model, recommender.catalogue, recommender.histories, recommender.templates
    )
    items = recommender.catalogue.item_ids
    plan = {
        user: [items[i % len(items)], items[(i + 3) % len(items)]]
        for i, user in enumerate(["u0", "u1", "u2"])
    }
    for user, new in plan.items():
        serial.update(user, new)
    threads = [threading.Thread(target=fresh.update, args=(user, new)) for user, new in plan.items()]
    threads += [threading.Thread(target=fresh.score, args=("u3",)) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for user in plan:
        assert fresh.history(user) == serial.history(user)
        assert torch.allclose(fresh.score(user), serial.score(user), atol=1e-5)


# ------------------------------------------------------------------------------------------- 10: bare strings
@pytest.mark.parametrize(
    "call",
    [
        lambda r: r.recommend(user="u1", exclude="m10"),
        lambda r: r.recommend_batch(["u1"], exclude=["m10"]),
        lambda r: r.recommend_batch(["u1"], exclude="m10"),
        lambda r: r.recommend_batch("u1"),
        lambda r: r.recommend(history="m10"),
        lambda r: r.score_batch("u10"),
        lambda r: r.score_batch(histories="m10"),
        lambda r: r.score_batch(histories=["m10"]),
        lambda r: r.score(history="m10"),
        lambda r: r.update("u1", "m10"),
        lambda r: r.warm_cache("u10"),
        lambda r: r.items("m10"),
        lambda r: r.score_batch({"u1": 1}),
        lambda r: r.score_batch(5),
    ],
)
def test_a_bare_string_is_refused_where_ids_are_expected(recommender, call):
    before = [list(h) for h in recommender.histories]
    with pytest.raises(UserError, match="where a list of ids is expected|expected a list of ids"):
        call(recommender)
    assert [list(h) for h in recommender.histories] == before


def test_sequences_of_ids_still_work(recommender):
    import numpy as np

    assert recommender.score_batch(("u1", "u10")).shape == (2, recommender.n_items)
    assert recommender.score_batch(np.array(["u1"])).shape == (1, recommender.n_items)
    top = recommender.recommend(user="u1", exclude=["m10"], k=recommender.n_items)
    assert "m10" not in [r.item for r in top]


def test_a_full_disk_during_save_pretrained_keeps_the_old_bundle(recommender, tmp_path, monkeypatch):
    import safetensors

    bundle = recommender.save_pretrained(tmp_path / "bundle")
    before = (bundle / "config.json").read_text()

    def full(*args, **kwargs):
        raise safetensors.SafetensorError(
            "Error while serializing: I/O error: No space left on device (os error 28)"
        )

    monkeypatch.setattr("llmrec.bundle.save_file", full)
    with pytest.raises(UserError, match="cannot write the recommender bundle: No space left on device"):
        recommender.save_pretrained(bundle, overwrite=True)
    assert (bundle / "config.json").read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]
