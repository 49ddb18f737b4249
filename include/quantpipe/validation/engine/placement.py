"""Where and how a model is evaluated on this worker (device, dtype, batch sizes), and the
parts of a causal LM the engine's forwards use. Splitting decoder layers over several GPUs:
``validation.sharding``."""

from __future__ import annotations

from dataclasses import dataclass

from ...settings import EvalEngine


@dataclass(frozen=True)
class Placement:
    """Where and how a model is evaluated on this worker."""

    device: str  # "cpu" or "cuda"
    dtype: str  # "float32" or "bfloat16"
    ppl_batch: int
    token_budget: int
    gen_batch: int
    cuda_graph: bool
    overlap: bool = False
    pack_width: int = 0
    shard_gpus: int = 1  # > 1: decoder layers split over this many GPUs (``sharding``)
    shard: str = "auto"  # EvalEngine.shard: when to split

    @property
    def kind(self) -> str:
        """What changes the figures (device and dtype), not how fast they come."""
        return f"{self.device}-{self.dtype}"

    @property
    def torch_dtype(self):
        import torch

        return getattr(torch, self.dtype)


def resolve_placement(e: EvalEngine | None = None) -> Placement:
    """``auto``: CUDA in bfloat16 when a GPU is visible, else CPU in float32 and batch 1
    perplexity windows (a CPU gains nothing from batching and pays memory for it)."""
    import torch

    e = e or EvalEngine.from_env()
    cuda = torch.cuda.is_available()
    if e.device == "cuda" and not cuda:
        raise RuntimeError("QUANTPIPE_EVAL_DEVICE=cuda but no CUDA device is visible on this worker")
    on_gpu = e.device == "cuda" or (e.device == "auto" and cuda)
    if on_gpu:
        return Placement("cuda", "bfloat16", e.ppl_batch, e.token_budget, e.gen_batch, e.cuda_graph, e.overlap,
                         e.pack_width, shard=e.shard)
    return Placement("cpu", "float32", 1, e.cpu_token_budget, e.gen_batch, False, pack_width=e.pack_width)


def parts(model):
    """(decoder body returning hidden states, output projection) of a causal LM."""
    return model.get_decoder(), model.get_output_embeddings()


def device_of(model):
    """Where inputs go and outputs come back: the input embeddings' device (on a model split
    over GPUs, ``sharding`` keeps embeddings, final norm and output head on that one GPU)."""
    return model.get_input_embeddings().weight.device
