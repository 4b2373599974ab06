"""The one early-stopping rule (`common.early_stopping`) shared by the LLM loop and the baselines."""

from common.early_stopping import EarlyStopping


def test_keeps_the_first_best_and_stops_after_patience_evaluations_without_gain():
    stopping = EarlyStopping(patience=2)
    flags = [stopping.update(score, at) for at, score in enumerate([0.1, 0.3, 0.3, 0.2], start=1)]
    assert flags == [True, True, False, False]  # a tie is not a gain: the earliest best is kept
    assert (stopping.best, stopping.best_at, stopping.stop) == (0.3, 2, True)
    never = EarlyStopping(patience=0)
    for at in range(1, 50):
        never.update(1.0 / at, at)
    assert never.best_at == 1 and not never.stop


def test_resumes_from_saved_state():
    """The LLM loop rebuilds the rule from its checkpointed state every evaluation."""
    stopping = EarlyStopping(patience=3, best=0.5, best_at=100, without_gain=2)
    assert not stopping.update(0.4, 150) and stopping.stop
    assert EarlyStopping(patience=3, best=0.5, best_at=100, without_gain=2).update(0.6, 150)
