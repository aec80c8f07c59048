r"""Per-example learning statistics as training callbacks: forgetting events and their one-step prediction.

A *forgetting event* of example i at step t: i was classified correctly before the update of step t and wrongly
after it. The lpNTK paper (Table 1, its official ``analysis/forget_el2n.py``) predicts these events for the examples
of the previous minibatch from Eq. 1, the first-order change of their predictions caused by the current minibatch
(:func:`mpe.kernels.delta_q`); :class:`ForgettingPredictor` does this inside the one training loop.
"""
from __future__ import annotations

import torch

from .kernels import delta_q

__all__ = ["ForgettingPredictor", "VisitRecorder", "LearningDifficulty", "forgetting_counts", "regularity", "el2n",
           "precision_recall_f1"]


def el2n(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """EL2N score ‖softmax(z) − e_y‖₂ per example (N,) (Paul et al. 2021)."""
    q = torch.softmax(logits, 1)
    return (q - torch.nn.functional.one_hot(y, q.shape[1]).to(q.dtype)).norm(dim=1)


class VisitRecorder:
    """Callback: ``metric(logits, y)`` of each example at every visit, from the training forward pass *before* the
    update on its minibatch. ``history`` (epochs, N) holds one value per epoch (NaN where an example was not visited)."""

    def __init__(self, n: int, metric=None):
        self.n, self.metric = n, metric or (lambda logits, y: (logits.argmax(1) == y).float())
        self.current, self.history = torch.full((n,), float("nan")), []

    def on_batch_end(self, state, idx, logits, y) -> None:
        self.current[idx.cpu()] = self.metric(logits.detach().float(), y).cpu()

    def on_epoch_end(self, state) -> None:
        self.history.append(self.current)
        self.current = torch.full((self.n,), float("nan"))


class LearningDifficulty(VisitRecorder):
    """Each example's EL2N at every visit, before the update on its minibatch (as the official lpNTK code does);
    ``total`` (N,) is the sum over training, the learning difficulty (the area under the example's learning curve)."""

    def __init__(self, n: int):
        super().__init__(n, el2n)

    @property
    def total(self) -> torch.Tensor:
        return torch.stack(self.history).nansum(0) if self.history else torch.zeros(self.n)


def forgetting_counts(correct: torch.Tensor) -> torch.Tensor:
    """Toneva et al.'s forgetting score from per-visit correctness (epochs, N): the number of correct -> incorrect
    transitions between consecutive visits, with +inf for examples never classified correctly (so that they sort
    last, whatever the number of epochs). Returns (N,); see :func:`regularity` for the other measures."""
    r = regularity(correct)
    return torch.where(r["never"], torch.full_like(r["events"], float("inf")), r["events"])


def regularity(correct: torch.Tensor) -> dict:
    r"""Sample-regularity measures from a correctness history (T, N) (notes on the regularity paper, §1.2,
    reconstructed): for training examples the per-visit correctness (:class:`VisitRecorder`), for test examples the
    correctness at each evaluation (e.g. :class:`mpe.train.PerExampleRecorder` at every epoch end).

    - ``cb``: the cumulative number of correct classifications, CBTL (train) or CBGL (test), (N,);
    - ``cb_norm``: the same divided by the number of evaluations T (Jiang et al.'s cumulative accuracy), in [0, 1];
    - ``events``: correct -> incorrect transitions, forgetting events (train) or mal-generalising events (test);
    - ``never``: examples never classified correctly (they have ``cb = 0`` and no events);
    - ``events_for_sorting``: ``events`` with the never-correct examples set to T, Toneva et al.'s rule for ranking.
    """
    c = torch.as_tensor(correct, dtype=torch.float)
    if c.dim() != 2 or not torch.all((c == 0) | (c == 1)):
        raise ValueError("correct must be a (T, N) tensor of 0/1 values (no missing visits)")
    t = c.shape[0]
    events = ((c[:-1] == 1) & (c[1:] == 0)).sum(0).float()
    never = ~(c == 1).any(0)
    return dict(cb=c.sum(0), cb_norm=c.mean(0), events=events, never=never,
                events_for_sorting=torch.where(never, torch.full_like(events, float(t)), events))


def precision_recall_f1(tp: int, fp: int, fn: int) -> tuple[float, float, float]:
    """Precision, recall and F1; an undefined precision or recall is 1.0 (as in the official code)."""
    p = tp / (tp + fp) if tp + fp else 1.0
    r = tp / (tp + fn) if tp + fn else 1.0
    return p, r, (2 * p * r / (p + r) if p + r else 0.0)


def _correct_and_probs(model, x, y):
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            q = torch.softmax(model(x), 1)
    finally:
        model.train(was_training)
    return q.argmax(1) == y, q


class ForgettingPredictor:
    r"""Callback: at every step t, the examples of minibatch t−1 are checked before and after the update on
    minibatch t, and Eq. 1 predicts their new predictions q̂ = q_{t−1} + Δq with the step's learning rate.

    True event: correct at θ_{t−1} and wrong at θ_t. Predicted event: correct at θ_{t−1} and argmax q̂ ≠ y. Counts
    ``tp``, ``fp``, ``fn``, ``tn`` are summed over the first ``max_steps`` steps (all if None); ``checked`` counts the
    examples that were correct before the update (the ones that can be forgotten). ``el2n_error`` is the mean of
    |EL2N(q̂)/EL2N(q_t) − 1|. Eq. 1 is exact to first order for plain SGD (no momentum, no weight decay).
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, max_steps: int | None = None):
        self.x, self.y, self.max_steps = x, y, max_steps
        self.prev, self.pending = None, None
        self.tp = self.fp = self.fn = self.tn = self.checked = 0
        self.el2n_errors = []

    def on_batch_start(self, state, idx) -> None:
        self.pending = None
        if self.prev is None or (self.max_steps is not None and state.step >= self.max_steps):
            return
        device = next(state.model.parameters()).device
        xp, yp = self.x[self.prev].to(device), self.y[self.prev].to(device)
        correct, q = _correct_and_probs(state.model, xp, yp)
        lr = state.optimizer.param_groups[0]["lr"]
        q_hat = q + delta_q(state.model, xp, self.x[idx].to(device), self.y[idx].to(device), lr)
        self.pending = (xp, yp, correct, q_hat)

    def on_batch_end(self, state, idx, *_) -> None:
        if self.pending is not None:
            xp, yp, correct, q_hat = self.pending
            after, q_t = _correct_and_probs(state.model, xp, yp)
            true = correct & ~after
            pred = correct & (q_hat.argmax(1) != yp)
            self.tp += int((true & pred).sum())
            self.fp += int((~true & pred).sum())
            self.fn += int((true & ~pred).sum())
            self.tn += int((~true & ~pred).sum())
            self.checked += int(correct.sum())
            onehot = torch.nn.functional.one_hot(yp, q_t.shape[1]).to(q_t.dtype)
            ratio = (q_hat - onehot).norm(dim=1) / (q_t - onehot).norm(dim=1).clamp_min(1e-12)
            self.el2n_errors.append((ratio - 1).abs().mean().item())
        self.prev = idx.cpu()

    def summary(self) -> dict:
        """Counts, precision, recall, F1, the number of events and their rate among the examples that were correct."""
        p, r, f1 = precision_recall_f1(self.tp, self.fp, self.fn)
        events = self.tp + self.fn
        return dict(tp=self.tp, fp=self.fp, fn=self.fn, tn=self.tn, precision=p, recall=r, f1=f1, events=events,
                    event_rate=events / max(self.checked, 1),
                    el2n_error=sum(self.el2n_errors) / max(len(self.el2n_errors), 1))
