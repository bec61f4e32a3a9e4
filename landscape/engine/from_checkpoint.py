"""From a checkpoint and specs to an Objective: the measurement set every result records."""

from __future__ import annotations

import torch

from landscape.engine import distributed as ranks
from landscape.engine.objective import Objective
from landscape.inputs.batches import BatchError, logits, model_arguments, to_device
from landscape.inputs.checkpoints import Checkpoint, CheckpointError, file_sha256
from landscape.inputs.data import BatchSet, DataError, Dataset, DataSpec, MeasurementSet
from landscape.inputs.models import model_for_data


def resolve_data(checkpoint: Checkpoint, data: str | None) -> DataSpec:
    """The data spec given (`data`), else the one the checkpoint carries."""
    if data is not None:
        return DataSpec(data)
    if checkpoint.data_spec is None:
        raise CheckpointError(
            f"{checkpoint.path} carries no data spec; pass data=... (digits, mnist1d, cifar10:DIR, npz:FILE, module:callable)"
        )
    return DataSpec.from_dict(checkpoint.data_spec)


def resolve_model_spec(model: str | None, model_kwargs: dict | None, dataset: Dataset) -> dict | None:
    """A `model` name fills its input shape and classes from the data; None keeps the stored spec."""
    if model is None:
        return None
    return model_for_data(model, dataset, **(model_kwargs or {}))[1]


def objective_from_checkpoint(
    checkpoint: Checkpoint,
    *,
    data: str | None = None,
    model: str | None = None,
    model_kwargs: dict | None = None,
    measurement: MeasurementSet = MeasurementSet(),
    distributed: bool = False,
    sharded: bool = False,
    replicas: int = 1,
    probes: str = "whole",
    **objective_options,
) -> Objective:
    """Build the Objective on the measurement set, recording checkpoint, data and samples.

    `distributed=True` (under torchrun) gives each rank its round-robin shard of the batches and
    an Objective that sums over the ranks (landscape.engine.distributed). `sharded=True` (under torchrun) gives
    a ShardedObjective instead: the parameters sharded over the ranks by FSDP2, in `replicas` data-parallel
    replicas, its `probes` drawn whole or piece by piece (landscape.engine.sharded).
    """
    data_spec = resolve_data(checkpoint, data)
    dataset = data_spec.load()
    model_spec = resolve_model_spec(model, model_kwargs, dataset)
    net = checkpoint.build_model(model_spec)
    check_data_fits(net, dataset, checkpoint, model_spec or checkpoint.model_spec)
    check_measurement_fits(measurement, dataset)
    batches = measurement.batches(dataset)
    metadata = {
        "checkpoint": checkpoint.path,
        "model_spec": model_spec or checkpoint.model_spec,
        "checkpoint_sha256": file_sha256(checkpoint.path),
        "data": data_spec.to_dict(),
        "measurement": measurement.describe(dataset),
    }
    if sharded:
        from landscape.engine.sharded import ShardedObjective

        options = {k: v for k, v in objective_options.items() if k in SHARDED_OPTIONS}
        return ShardedObjective(net, batches, metadata=metadata, replicas=replicas, probes=probes, **options)
    if distributed:
        batches = ranks.shard(batches)
    return Objective(net, batches, metadata=metadata, distributed=distributed, **objective_options)


SHARDED_OPTIONS = ("loss", "mode", "dtype", "device", "hvp_method", "hvp_check")  # the rest is refused or moot there


def check_data_fits(net: torch.nn.Module, dataset: Dataset | BatchSet, checkpoint: Checkpoint, model_spec: dict | None) -> None:
    """One forward pass on one sample: inputs the model cannot take, or labels beyond its outputs, are one clear error.

    Without it a feature-size mismatch surfaces as a matmul error deep in the first loss, and a
    label ≥ the number of outputs as an IndexError inside cross-entropy.
    """
    if isinstance(dataset, BatchSet):
        return _check_batches_fit(net, dataset, checkpoint)
    x = dataset.x_train[:1] if len(dataset.x_train) else dataset.x_test[:1]
    model = f"the model in {checkpoint.path}" + (f" ({model_spec['name']})" if model_spec else "")
    fix = "pass data=... matching the checkpoint" + (
        f" (it was made with {checkpoint.data_spec['spec']!r})" if checkpoint.data_spec else ""
    )
    fix += " or a model=... for this data"
    training = net.training
    net.eval()  # eval: a forward in train mode would move BatchNorm running statistics
    try:
        with torch.no_grad():
            out = net(x)
    except (RuntimeError, ValueError) as error:  # BatchNorm's "expected 4D input (got 3D input)" is a ValueError
        expected = (model_spec or {}).get("kwargs", {}).get("input_shape")
        wants = f"expects {tuple(expected)}" if expected else f"cannot take them ({str(error).splitlines()[0]})"
        raise CheckpointError(
            f"data {dataset.spec!r} gives inputs of shape {tuple(x.shape[1:])} but {model} {wants}: {fix}"
        ) from None
    finally:
        net.train(training)
    out = logits(out)
    labels = [y for y in (dataset.y_train, dataset.y_test) if len(y)]
    if out.ndim == 2 and labels:
        top = max(int(y.max()) for y in labels)
        if top >= out.shape[1]:
            raise CheckpointError(
                f"data {dataset.spec!r} has labels up to {top} ({top + 1} classes) but {model} has {out.shape[1]} outputs: {fix}"
            )


def _check_batches_fit(net: torch.nn.Module, data: BatchSet, checkpoint: Checkpoint) -> None:
    """The model called on the first batch of a user's own batches; what it cannot take is one line."""
    # the net is on the CPU here; a callable's batches may be on a GPU (the Objective moves them to its device)
    dtype = next((p.dtype for p in net.parameters() if p.is_floating_point()), torch.float32)
    args, kwargs = model_arguments(to_device(data.train[0], torch.device("cpu"), dtype))
    training = net.training
    net.eval()
    try:
        with torch.no_grad():
            logits(net(*args, **kwargs))
    except BatchError:
        raise
    except (RuntimeError, TypeError, ValueError, IndexError) as error:
        given = ", ".join(kwargs) if kwargs else f"a tensor of shape {tuple(args[0].shape)}"
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise CheckpointError(
            f"the model in {checkpoint.path} cannot take the batches of {data.spec!r} ({given}): {reason}"
        ) from None
    finally:
        net.train(training)


def check_measurement_fits(measurement: MeasurementSet, dataset: Dataset | BatchSet) -> None:
    """A subset no larger than its split (before MeasurementSet would refuse it, in other words)."""
    if isinstance(dataset, BatchSet):
        measurement.batches(dataset)  # refuses n_samples, and a split the callable did not give
        return
    available = len(dataset.split(measurement.split)[1])
    if measurement.n_samples is not None and measurement.n_samples > available:
        raise DataError(
            f"n_samples={measurement.n_samples}: the {measurement.split} split of {dataset.spec!r} "
            f"has {available} samples; ask for at most {available}"
        )
