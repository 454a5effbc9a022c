"""The streaming loader's front: ``build_loader`` picks how batches leave a rank.

    loader = build_loader("data.yaml", batch_size=8, num_workers=2, max_seq_len=4096)
    for batch in loader:
        batch["input_ids"], batch["labels"], batch["attention_mask"]  # LongTensor [B, T]
        batch["lengths"]                                               # LongTensor [B]
        batch["dataset"], batch["__key__"]                             # list[str]

Layers: :mod:`wds_tools.stream` (torch-free core: plans, readers, mixing, collation, state),
:mod:`wds_tools.torch_loader` (DataLoader workers, tensors, ``torch.distributed``; imported
only when used), and this front. ``output="numpy", num_workers=0`` runs without torch. For a
``DataLoader`` of your own (torchdata, Lightning, the HF Trainer) use
``wds_tools.torch_loader.TokenStream``. See ``docs/streaming.md`` for the semantics.
"""

from __future__ import annotations

from typing import Optional, Union

from . import io as wio
from .config import DataConfig
from .stream import (
    STATE_VERSION,
    DatasetReader,
    NumpyBackend,
    Partition,
    StreamingLoader,
    build_stream,
    iter_mixed,
    load_plans,
    merge_states,
)

__all__ = [
    "build_loader",
    "StreamingLoader",
    "Partition",
    "merge_states",
    "DatasetReader",
    "load_plans",
    "iter_mixed",
    "STATE_VERSION",
    "OUTPUTS",
]

OUTPUTS = ("torch", "numpy")


def build_loader(
    data_config: Union[DataConfig, str],
    *,
    rank: Optional[int] = None,
    world_size: Optional[int] = None,
    batch_size: int = 1,
    num_workers: int = 0,
    max_seq_len: int = 4096,
    pad_id: int = 0,
    seed: Optional[int] = None,
    pack: bool = False,
    prefetch_factor: int = 2,
    pin_memory: bool = False,
    transfer_batches: int = 4,
    shuffle: Optional[bool] = None,
    max_epochs: Optional[int] = None,
    output: str = "torch",
    io_options: wio.IOOptions = wio.DEFAULT,
    max_tokens: Optional[int] = None,
    grad_accum: int = 1,
    partitions: Optional[int] = None,
) -> StreamingLoader:
    """The loader of one data-parallel rank.

    Args:
        data_config: a ``DataConfig``, the path of its YAML, or a dataset manifest (local path
            or URL of ``index.json``: one dataset).
        rank, world_size: default from ``torch.distributed`` when initialized, else the
            ``RANK``/``WORLD_SIZE`` environment (set by ``deepspeed`` and ``torchrun``), else 0/1.
        batch_size: samples per batch (rows per batch when packing; with ``max_tokens``, the
            most samples of a micro-batch).
        num_workers: DataLoader worker processes (0: read in this process); every worker builds
            its part of every micro-batch. At most ``partitions / world_size``.
        max_seq_len: samples are truncated on the right to this many tokens.
        pad_id: input id of padding (labels are -100 there, attention mask 0).
        seed: overrides the config's seed.
        pack: put several samples in each row, with ``position_ids`` and ``segment_ids``.
        prefetch_factor: chunks each worker prepares ahead.
        pin_memory: expand worker batches into pinned memory (with CUDA).
        transfer_batches: a worker sends its pieces of this many consecutive batches at once
            (one shared memory buffer: far less per-batch overhead in the training process).
        shuffle, max_epochs: override the config (``shuffle=False``: stored order;
            ``max_epochs``: every dataset ends after that many epochs).
        output: ``"torch"`` (int64 tensors) or ``"numpy"`` (int64 arrays; with
            ``num_workers=0`` torch is never imported).
        io_options: transport and cache settings; the config's ``cache``, ``allow_pipe`` and
            ``verify_checksums`` are added to them.
        max_tokens: token-budget micro-batches: consecutive samples of the stream while the
            padded batch (rows x its longest row, after truncation) stays within ``max_tokens``
            positions and ``batch_size`` rows, so short samples make wide batches. A sample is
            truncated to ``min(max_seq_len, max_tokens)``. Needs an unbounded stream (no
            ``max_epochs``: stop by steps) and no packing.
        grad_accum: micro-batches per optimizer step (the loader counts steps for weight
            schedules and stratified batches; the global batch is ``batch_size * grad_accum *
            world_size``).
        partitions: the run's canonical partitions ``K`` (default: the config's
            ``partitions``, else ``12 * world_size`` at the start of a run; a resumed run keeps
            its own). A run can resume on any world size that divides ``K``; nothing else about
            the layout is fixed. See ``docs/streaming.md`` (elastic resume).
    """
    if output not in OUTPUTS:
        raise ValueError(f"output must be one of {', '.join(OUTPUTS)}, got {output!r}")
    if not isinstance(prefetch_factor, int) or prefetch_factor < 1:
        raise ValueError(f"prefetch_factor must be an integer >= 1, got {prefetch_factor!r}")
    backend: NumpyBackend
    if output == "torch" or num_workers:
        try:
            from .torch_loader import TorchBackend
        except ImportError as e:
            raise ValueError(
                f"output='torch' and DataLoader workers need torch ({e}): install "
                "torch, or use output='numpy' with num_workers=0"
            ) from None
        backend = TorchBackend(prefetch_factor, pin_memory, tensors=output == "torch")
    else:
        backend = NumpyBackend()
    return build_stream(
        data_config,
        rank=rank,
        world_size=world_size,
        batch_size=batch_size,
        num_workers=num_workers,
        max_seq_len=max_seq_len,
        pad_id=pad_id,
        seed=seed,
        pack=pack,
        transfer_batches=transfer_batches,
        shuffle=shuffle,
        max_epochs=max_epochs,
        backend=backend,
        io_options=io_options,
        max_tokens=max_tokens,
        grad_accum=grad_accum,
        partitions=partitions,
    )
