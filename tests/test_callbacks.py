"""The training-framework callbacks: a HuggingFace Trainer and a Lightning run log λ1 every N steps through their own
loggers, the training itself unchanged bit for bit, and the logged λ1 is Lanczos's on that step's weights."""

import random

import numpy as np
import pytest
import torch
from torch import nn

from landscape.curvature.spectrum import lanczos
from landscape.engine.objective import Objective
from landscape.engine.operators import HessianOperator
from landscape.inputs.batches import class_cross_entropy, token_cross_entropy
from landscape.training.callbacks import ScheduledTracking, sampled_batches, torch_optimizer

STEPS, EVERY = 20, 5


def fresh_lambda1(model, batches, loss=None):
    """λ1 of `model` on `batches` by Lanczos from scratch, to 1e-4 (ten times tighter than the tracker's)."""
    objective = Objective(model, batches, loss=loss, device="cpu", hvp_method="double-backward", hvp_check=False)
    return lanczos(HessianOperator(objective), 1, tol=1e-4)


def assert_same_lambda1(logged: dict, fresh):
    """|θ − λ| ≤ ‖r‖ bounds each Ritz value's distance to an eigenvalue: the two agree within their residuals."""
    residuals = logged["landscape/lambda1_residual"] + float(fresh.residuals[0])
    assert abs(logged["landscape/lambda1"] - float(fresh.values[0])) <= residuals, (logged, fresh.values, residuals)
    assert logged["landscape/lambda1_residual"] <= 1e-3 * logged["landscape/lambda1"]  # the tracker's tol


# ------------------------------------------------------------------------------------------------ shared parts


def test_sampled_batches_are_seeded_and_leave_every_global_random_state_as_it_was():
    """A collator that draws (as masked-LM masking does) sees seeded draws, and training's generators move not at all."""
    data = [{"x": torch.tensor([float(i)])} for i in range(30)]

    def noisy(items):
        x = torch.stack([item["x"] for item in items])
        return {"x": x + torch.rand(x.shape) + np.random.rand() + random.random()}

    torch.manual_seed(3), np.random.seed(3), random.seed(3)
    before = torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()
    first, again = (sampled_batches(data, noisy, 10, 4, seed=1) for _ in range(2))
    assert torch.equal(torch.get_rng_state(), before[0]) and np.array_equal(np.random.get_state()[1], before[1])
    assert random.getstate() == before[2]
    assert [len(b["x"]) for b in first] == [4, 4, 2]
    assert all(torch.equal(a["x"], b["x"]) for a, b in zip(first, again))
    other = sampled_batches(data, noisy, 10, 4, seed=2)
    assert not torch.equal(first[0]["x"], other[0]["x"])


def test_an_iterable_data_set_asks_for_batches():
    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter(range(3))

    with pytest.raises(ValueError, match="cannot be indexed: give the batches"):
        sampled_batches(Stream(), list, 4, 2, seed=0)


def test_the_optimizer_is_unwrapped_from_a_frameworks_wrapper():
    inner = torch.optim.SGD([nn.Parameter(torch.zeros(2))], lr=0.1)

    class Wrapper:  # accelerate's AcceleratedOptimizer holds the torch optimizer as .optimizer
        def __init__(self, optimizer):
            self.optimizer = optimizer

    assert torch_optimizer(Wrapper(Wrapper(inner))) is inner and torch_optimizer(inner) is inner
    assert torch_optimizer(None) is None


@pytest.mark.parametrize(
    "given, message",
    [
        (dict(every=0), "every must be an integer ≥ 1"),
        (dict(every=5, n_samples=0), "n_samples must be an integer ≥ 1"),
        (dict(every=5, measures=("eig", "sharpness")), "measures=.*name one or more of eig"),
        (dict(every=5, batches=[]), r"batches=\[\] holds no batch"),
    ],
)
def test_bad_arguments_are_refused_when_the_callback_is_made(given, message):
    with pytest.raises(ValueError, match=message):
        ScheduledTracking(**given)


def test_measurements_are_due_every_n_optimizer_steps_once_each():
    schedule = ScheduledTracking(5)
    assert not schedule.due(5)  # not started
    model = nn.Linear(2, 2)
    schedule.start(model, [(torch.randn(4, 2), torch.tensor([0, 1, 0, 1]))], None)
    assert [s for s in range(13) if schedule.due(s)] == [5, 10]
    schedule.measure(5, model)
    assert not schedule.due(5) and schedule.due(10)  # micro-batches of one accumulated step measure once
    assert schedule.history[0]["step"] == 5 and "landscape/lambda1" in schedule.history[0]


def test_preconditioned_sharpness_is_left_out_while_the_learning_rate_is_0():
    """A linear schedule's last step has η = 0, where the threshold 38/η has no value: the tracker leaves it out."""
    from landscape.training.train_tracking import CurvatureTracker

    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    batches = [(torch.randn(8, 3), torch.tensor([0, 1] * 4))]
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    nn.functional.cross_entropy(model(batches[0][0]), batches[0][1]).backward()
    optimizer.step()
    tracker = CurvatureTracker(batches, measures=("eig", "preconditioned-sharpness"), device="cpu")
    assert tracker.measure(model, optimizer)["preconditioned_threshold"] == pytest.approx(380)
    for group in optimizer.param_groups:
        group["lr"] = 0.0
    assert "preconditioned_sharpness" not in tracker.measure(model, optimizer)


# ------------------------------------------------------------------------------------------------ HF Trainer


def tiny_gpt2(**options):
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(
        vocab_size=50, n_positions=16, n_embd=32, n_layer=1, n_head=2, bos_token_id=0, eos_token_id=0, **options
    )
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config)  # dropout 0.1: training draws random numbers every step


class Tokens(torch.utils.data.Dataset):
    """96 sequences of 16 tokens counting up from a random start (mod 50), one token in five replaced by noise."""

    def __init__(self, n=96, length=16, vocab=50):
        g = torch.Generator().manual_seed(0)
        ids = (torch.randint(0, vocab, (n, 1), generator=g) + torch.arange(length)) % vocab
        noise = torch.rand(n, length, generator=g) < 0.2
        self.ids = torch.where(noise, torch.randint(0, vocab, (n, length), generator=g), ids)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def hf_train(folder, *, track: bool, resume=None):
    """20 steps of the Trainer (AdamW, linear decay), a checkpoint every 10; with the callback every 5 steps on 16
    training sequences. A recorder placed before the callback, as the reporting integrations are, sees every log."""
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from landscape.training.hf_callback import CurvatureCallback

    class Recorder(TrainerCallback):
        def __init__(self):
            self.logged = []

        def on_log(self, args, state, control, logs=None, **kwargs):
            self.logged.append((state.global_step, dict(logs)))

    args = TrainingArguments(
        str(folder),
        max_steps=STEPS,
        per_device_train_batch_size=8,
        learning_rate=3e-3,
        logging_steps=EVERY,
        save_steps=10,
        report_to=[],
        disable_tqdm=True,
        use_cpu=True,
        seed=0,
    )
    recorder = Recorder()
    trainer = Trainer(model=tiny_gpt2(), args=args, train_dataset=Tokens(), callbacks=[recorder])
    callback = CurvatureCallback(trainer, every=EVERY, n_samples=16) if track else None
    if track:
        trainer.add_callback(callback)
    trainer.train(resume_from_checkpoint=resume)
    return trainer, callback, recorder.logged


@pytest.fixture(scope="module")
def hf_runs(tmp_path_factory):
    pytest.importorskip("transformers")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("hf")
    plain = hf_train(root / "plain", track=False)
    tracked = hf_train(root / "tracked", track=True)
    resumed = hf_train(root / "resumed", track=True, resume=str(root / "tracked" / "checkpoint-10"))
    torch.set_num_threads(threads)
    return root, plain, tracked, resumed


def landscape_rows(log_history):
    return [row for row in log_history if "landscape/lambda1" in row]


@pytest.mark.slow
def test_the_hf_callback_leaves_training_unchanged(hf_runs):
    """With dropout drawing every step, the final weights with and without the callback are equal bit for bit."""
    _, (plain, _, _), (tracked, _, _), _ = hf_runs
    pairs = list(zip(plain.model.state_dict().items(), tracked.model.state_dict().items()))
    assert pairs and all(n == m and torch.equal(a, b) for (n, a), (m, b) in pairs)
    assert tracked.model.training is plain.model.training


@pytest.mark.slow
def test_the_hf_values_reach_the_trainers_loggers_at_their_steps(hf_runs):
    """Through Trainer.log: log_history and every callback's on_log (TensorBoard's, W&B's, ...) get them, and the
    trainer's own loss is still logged at the same steps."""
    _, _, (trainer, callback, logged), _ = hf_runs
    rows = landscape_rows(trainer.state.log_history)
    assert [row["step"] for row in rows] == [5, 10, 15, 20]
    assert [step for step, logs in logged if "landscape/lambda1" in logs] == [5, 10, 15, 20]
    assert [step for step, logs in logged if "loss" in logs] == [5, 10, 15, 20]
    assert [row["landscape/lambda1"] for row in rows] == [row["landscape/lambda1"] for row in callback.history]
    assert {"landscape/lambda1_residual", "landscape/lambda1_hvps", "landscape/track_seconds"} <= set(rows[0])


@pytest.mark.slow
def test_the_logged_lambda1_is_lanczos_on_that_steps_saved_checkpoint(hf_runs, one_thread):
    from transformers import GPT2LMHeadModel

    root, _, (trainer, callback, _), _ = hf_runs
    assert callback.tracker.loss is token_cross_entropy  # the causal LM's loss, checked against its own .loss
    rows = {row["step"]: row for row in callback.history}
    for step in (10, 20):
        saved = GPT2LMHeadModel.from_pretrained(root / "tracked" / f"checkpoint-{step}")
        assert_same_lambda1(rows[step], fresh_lambda1(saved, callback.tracker.batches, token_cross_entropy))


@pytest.mark.slow
def test_a_resumed_hf_run_measures_from_the_checkpoints_step_on(hf_runs):
    """Resumed from step 10 with a new callback: the same batches, measurements at 15 and 20 only, the log history
    of the first run kept before them, the same training and the same λ1 within the residuals (started cold)."""
    _, _, (tracked, first, _), (resumed, callback, _) = hf_runs
    assert [row["step"] for row in callback.history] == [15, 20]
    assert [row["step"] for row in landscape_rows(resumed.state.log_history)] == [5, 10, 15, 20]
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(first.tracker.batches, callback.tracker.batches))
    assert all(torch.equal(a, b) for a, b in zip(tracked.model.parameters(), resumed.model.parameters()))
    rows = {row["step"]: row for row in first.history}
    for row in callback.history:
        residuals = row["landscape/lambda1_residual"] + rows[row["step"]]["landscape/lambda1_residual"]
        assert abs(row["landscape/lambda1"] - rows[row["step"]]["landscape/lambda1"]) <= residuals


def test_the_default_loss_is_the_models_own():
    """Token cross-entropy for a causal LM, class cross-entropy for a classifier; a model trained on another loss
    (a one-output regression head, mean squared error) is refused, naming `loss`."""
    transformers = pytest.importorskip("transformers")
    from landscape.training.hf_callback import checked_model_loss

    ids = Tokens().ids[:4]
    assert checked_model_loss(tiny_gpt2(), {"input_ids": ids, "labels": ids}) is token_cross_entropy
    config = dict(vocab_size=50, n_positions=16, n_embd=32, n_layer=1, n_head=2, pad_token_id=0, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    classifier = transformers.GPT2ForSequenceClassification(transformers.GPT2Config(num_labels=3, **config))
    assert checked_model_loss(classifier, {"input_ids": ids, "labels": torch.tensor([0, 2, 1, 0])}) is class_cross_entropy
    assert classifier.training  # its mode is given back
    regression = transformers.GPT2ForSequenceClassification(transformers.GPT2Config(num_labels=1, **config))
    with pytest.raises(ValueError, match="the model's own loss on the first batch is .* pass loss="):
        checked_model_loss(regression, {"input_ids": ids, "labels": torch.tensor([0.5, 2.0, 1.0, 0.0])})


# ------------------------------------------------------------------------------------------------ Lightning


@pytest.mark.slow
def test_the_lightning_callback_logs_lambda1_and_leaves_training_unchanged(tmp_path, one_thread):
    """20 steps of Adam with dropout, with and without the callback: equal weights; the CSV logger's rows at steps
    5..20; λ1 at the last step is Lanczos's on the final weights, on batches drawn from the training DataLoader."""
    pl = pytest.importorskip("lightning.pytorch")
    from lightning.pytorch.loggers import CSVLogger

    from landscape.training.lightning_callback import LightningCurvatureCallback

    class Net(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(10, 32), nn.Tanh(), nn.Dropout(0.1), nn.Linear(32, 3))

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.cross_entropy(self(x), y)

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=1e-2)

    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(200, 10, generator=g), torch.randint(0, 3, (200,), generator=g))

    def fit(callbacks, folder):
        pl.seed_everything(0, verbose=False)
        model = Net()
        loader = torch.utils.data.DataLoader(data, batch_size=16, shuffle=True)
        options = dict(enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=EVERY)
        trainer = pl.Trainer(max_steps=STEPS, accelerator="cpu", logger=CSVLogger(folder), callbacks=callbacks, **options)
        trainer.fit(model, loader)
        return model, trainer

    plain, _ = fit([], tmp_path / "plain")
    callback = LightningCurvatureCallback(every=EVERY, measures=("eig", "preconditioned-sharpness"), n_samples=48)
    tracked, trainer = fit([callback], tmp_path / "tracked")
    assert all(torch.equal(a, b) for a, b in zip(plain.parameters(), tracked.parameters()))
    assert [row["step"] for row in callback.history] == [5, 10, 15, 20]
    assert [len(b[1]) for b in callback.tracker.batches] == [16, 16, 16]
    assert_same_lambda1(callback.history[-1], fresh_lambda1(tracked, callback.tracker.batches))
    assert callback.history[-1]["landscape/preconditioned_threshold"] == pytest.approx(38 / 1e-2)  # Adam's 38/η
    import csv

    rows = list(csv.DictReader(open(trainer.logger.experiment.metrics_file_path)))
    logged = {int(r["step"]): float(r["landscape/lambda1"]) for r in rows if r.get("landscape/lambda1")}
    assert logged == {row["step"]: row["landscape/lambda1"] for row in callback.history}
