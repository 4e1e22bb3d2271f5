import socket
import urllib.request

from train.telemetry import TrainingTelemetry


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_exporter_serves_training_metrics_on_base_port_plus_rank():
    base = _port() - 1
    telemetry = TrainingTelemetry(base, rank=1)
    telemetry.step(tokens=120, lr=1e-3, step_seconds=0.2, data_seconds=0.01)
    telemetry.step(tokens=80, lr=1e-3, step_seconds=0.3, data_seconds=0.02)
    telemetry.losses(first_step=1, values=[2.5, 2.0])
    telemetry.evaluation({"split": "valid", "model": {"NDCG@10": 0.3}, "popularity": {"NDCG@10": 0.1}})
    text = urllib.request.urlopen(f"http://127.0.0.1:{base + 1}/metrics", timeout=5).read().decode()
    assert 'lmrec_train_tokens_total{rank="1"} 200.0' in text
    assert 'lmrec_train_steps_total{rank="1"} 2.0' in text
    assert 'lmrec_train_loss{rank="1"} 2.0' in text
    assert 'lmrec_train_step_seconds_count{rank="1"} 2.0' in text
    assert 'lmrec_eval_metric{metric="NDCG@10",rank="1",scorer="model",split="valid"} 0.3' in text


def test_port_zero_starts_no_server():
    assert TrainingTelemetry(0, rank=0).port == 0


def test_tensorboard_scalars_from_rank_zero_only(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    board = TrainingTelemetry(0, rank=0, tensorboard_dir=str(tmp_path / "tb"))
    board.step(tokens=10, lr=1e-3, step_seconds=0.1, data_seconds=0.0)
    board.losses(first_step=1, values=[3.0])
    board.evaluation({"split": "valid", "model": {"NDCG@10": 0.25}, "popularity": {"NDCG@10": 0.1}})
    board.close()
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert {"train/loss", "valid/model/NDCG@10"} <= set(events.Tags()["scalars"])
    assert events.Scalars("valid/model/NDCG@10")[0].value == 0.25
    assert TrainingTelemetry(0, rank=1, tensorboard_dir=str(tmp_path / "other")).board is None
