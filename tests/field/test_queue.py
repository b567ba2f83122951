"""What to label next: the audit sample first, then abstained, rare slices, uncertain; images captured by the server
for labellers, bounded; `roadwork label-next` writes the queue."""

from __future__ import annotations

import pandas as pd
import pytest

from roadwork.field.capture import ImageCapture
from roadwork.field.queue import label_queue
from roadwork.field.store import StoredPrediction, open_store


def _p(i: int, *, audit: bool = False, abstain: bool = False, top: float = 0.9, weather: str = "clear"):  # type: ignore[no-untyped-def]
    return StoredPrediction(
        f"id-{i}",
        100.0 + i,
        "v1",
        "roadwork",
        [1 - top, top],
        ["roadwork"],
        abstain,
        "model",
        {"weather": weather},
        audit,
    )


def test_the_queue_takes_the_audit_sample_first_then_abstained_rare_slices_and_uncertain(tmp_path):
    store = open_store(tmp_path / "field.db")
    rows = [_p(i, top=0.95) for i in range(40)]  # confident, common slice
    rows += [_p(100, audit=True), _p(101, audit=True)]
    rows += [_p(200, abstain=True, top=0.6), _p(201, abstain=True, top=0.52)]
    rows += [_p(300, weather="snow")]
    rows += [_p(400, top=0.55)]  # answered, near the decision
    store.add_predictions(rows)
    store.add_labels([("id-101", 1)])  # labelled already: not listed
    queue = label_queue(store, 8)
    assert [q["id"] for q in queue[:5]] == ["id-100", "id-201", "id-200", "id-300", "id-400"]
    assert [q["reason"] for q in queue[:5]] == ["audit", "abstained", "abstained", "new slice", "uncertain"]
    assert len(queue) == 8 and "id-101" not in {q["id"] for q in queue}
    assert queue[0]["meta.weather"] == "clear" and queue[0]["image"] == ""
    store.close()


def test_captured_images_are_bounded_and_the_oldest_go_first(tmp_path):
    cap = ImageCapture(tmp_path / "images", max_bytes=2500)
    cap.add([(f"a-{i}", b"\xff\xd8\xff" + bytes(997)) for i in range(4)])
    kept = sorted(p.name for p in (tmp_path / "images").iterdir())
    assert kept == ["a-2.jpg", "a-3.jpg"] and cap.total == 2000
    again = ImageCapture(tmp_path / "images", max_bytes=2500)  # a restart counts what is there
    assert again.total == 2000


def test_the_server_captures_audit_and_abstained_images_and_label_next_lists_them(tiny_run, tmp_path, capsys):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from roadwork.cli import main
    from roadwork.serve import ServeSettings, create_app

    images = [p.read_bytes() for p in sorted((tiny_run[1].run_dir / "data" / "images").glob("*.jpg"))[:5]]
    db, folder = tmp_path / "field.db", tmp_path / "captured"
    settings = ServeSettings(name="tiny", feedback_db=str(db), audit_rate=1.0, log_images=str(folder))
    with TestClient(create_app(tiny_run[1].bundle, settings)) as c:
        files = [("files", (f"{i}.jpg", b, "image/jpeg")) for i, b in enumerate(images)]
        preds = c.post("/v1/classify", files=files).json()["predictions"]
    assert sorted(p.name for p in folder.iterdir()) == sorted(f"{p['id']}.jpg" for p in preds)
    assert (folder / f"{preds[0]['id']}.jpg").read_bytes() == images[0]
    out = tmp_path / "queue.csv"
    assert main(["label-next", str(db), f"out={out}", f"images={folder}"]) == 0
    queue = pd.read_csv(out)
    assert set(queue["id"]) == {p["id"] for p in preds} and set(queue["reason"]) == {"audit"}
    assert all(str(path).startswith(str(folder)) for path in queue["image"])
    assert "wrote" in capsys.readouterr().out
    assert main(["label-next", str(tmp_path / "nope.db")]) == 2
    assert main(["label-next", str(db), f"out={tmp_path / 'no' / 'q.csv'}"]) == 2  # said before any work
    assert not (tmp_path / "no").exists()
    with pytest.raises(ValueError, match="feedback_db"):
        ServeSettings(log_images=str(folder))
