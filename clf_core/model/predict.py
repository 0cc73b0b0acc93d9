"""Scoring: load an artifact once, then label batches of texts.

Within each call the texts are sorted by token length and cut into batches, so a batch pads to
rows of nearly equal length (few wasted tokens), then results are put back in input order.
Right padding plus the attention mask means a row gets the same probabilities alone or in any
batch (tested to 1e-4). The probabilities are calibrated: the logits are divided by the
temperature the artifact was calibrated with (clf_core.model.calibration), so every scorer (this one,
the label job's actors, the bench) gives a row the same calibrated confidence.

For scoring, `Predictor.load` folds the LoRA adapters into 16-bit copies of the projections they
adapt (clf_core.model.build.merge_lora_for_scoring: one matmul instead of three, scores within 1e-3)
and, on a GPU, compiles the forward pass (model.compile). A compiled forward recompiles for
every new input shape, so it pads a batch's length up to a few buckets (SHAPE_LENGTHS) and its
row count up to a short list (batch_size, 1/2, 1/4, 1/8 of it): a run compiles at most
len(lengths) x 4 shapes, counted in `Predictor.forward_stats`. The eager path pads to each
batch's own longest row, as before.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from clf_core.model.config import SCORING_BATCH_SIZE
from clf_core.model.artifact import Artifact, open_artifact
from clf_core.model.batching import TokenStats
from clf_core.errors import ArtifactError, ConfigError
from clf_core.model.backbone import PREQUANTIZED_META, backbone_fingerprint, header_fingerprint, resolve_backbone
from clf_core.model.build import (Hardware,
    build_classifier,
    load_tokenizer,
    load_trainable_state,
    merge_lora_for_scoring,
    resolve_hardware)
from clf_core.storage import cache_dir

log = logging.getLogger(__name__)


@dataclass
class Predictions:
    labels: list[str]            # predicted class name per text
    label_ids: np.ndarray        # its index in the artifact's label order
    confidence: np.ndarray       # probability of the predicted class
    probabilities: np.ndarray    # (rows, classes), rows sum to 1

    def __len__(self) -> int:
        return len(self.labels)


# Padded lengths of a compiled forward: steps of 8 tokens up to 32 (ledger lines are ~15-25
# tokens, so most batches land on 16, 24 or 32), then coarser; the last bucket is max_tokens.
SHAPE_LENGTHS = (8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)
# Row counts of a compiled forward, as fractions of the batch size: only a call's last batch is
# short, and padding it up to the next of these wastes at most half of one batch per call.
SHAPE_ROW_DIVISORS = (1, 2, 4, 8)


def length_buckets(max_tokens: int) -> list[int]:
    return sorted({n for n in SHAPE_LENGTHS if n < max_tokens} | {max_tokens})


def row_buckets(batch_size: int) -> list[int]:
    return sorted({max(1, batch_size // d) for d in SHAPE_ROW_DIVISORS})


def bucket(n: int, buckets: list[int]) -> int:
    """The smallest bucket that holds n (buckets sorted ascending; n never exceeds the last)."""
    return next(b for b in buckets if b >= n)


def use_compile(setting: str, device: torch.device) -> bool:
    """model.compile: 'auto' compiles on CUDA only. On 2 CPU cores at tiny size the compiled forward
    ran at 0.91-0.94x the eager one (its buckets compute 1/0.69 of the real tokens, eager 1/0.91)
    and its first call took 63 s to compile, 5 s from the node's cache (docs/performance.md)."""
    if setting not in ("auto", "on", "off"):
        raise ConfigError(f"compile = {setting!r}: allowed: auto, on, off")
    return setting == "on" or (setting == "auto" and device.type == "cuda")


def use_node_compile_cache() -> str:
    """Keep Inductor's compiled graphs (and Triton's kernels, under the same folder) in the node's
    cache folder beside the fetched backbones, instead of torch's default /tmp/torchinductor_<user>:
    the next scoring actor on the node, or tomorrow's run, loads them instead of compiling again
    (Inductor's FX graph and AOTAutograd caches are on by default; only their folder is chosen
    here). A TORCHINDUCTOR_CACHE_DIR an operator set wins. Importing torch's Inductor (transformers
    does) writes the default into the variable, so the default is what gets replaced."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    current = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if current is None or os.path.abspath(current) == os.path.abspath(default_cache_dir()):
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache_dir() / "torchinductor")
    return os.environ["TORCHINDUCTOR_CACHE_DIR"]


@dataclass
class ForwardStats:
    """What the scoring forward did: where its time went, and the shapes a compiled forward met."""
    compiled: bool = False
    merged_lora: int = 0              # projections with their adapter folded in (0: unmerged)
    calls: int = 0                    # predict() calls
    rows: int = 0
    tokenize_s: float = 0.0           # token lengths + encoding of each batch
    forward_s: float = 0.0            # model forward, softmax and the copy back (waits for the GPU)
    total_s: float = 0.0              # whole predict() calls; the rest is sorting, padding, moving
    shapes: dict = field(default_factory=dict)  # (rows, tokens) -> seconds of its first forward

    @property
    def recompiles(self) -> int:
        """Distinct input shapes the compiled forward met: one compile each (0 when eager)."""
        return len(self.shapes) if self.compiled else 0

    @property
    def warmup_s(self) -> float:
        """Seconds of the first forward of each shape, compiles included (compiled only)."""
        return sum(self.shapes.values()) if self.compiled else 0.0

    @property
    def rest_s(self) -> float:
        return max(self.total_s - self.tokenize_s - self.forward_s, 0.0)


class Predictor:
    def __init__(self, model, tokenizer, labels: list[str], max_tokens: int, device: torch.device,
                 batch_size: int = SCORING_BATCH_SIZE, model_version: str = "unsaved", temperature: float = 1.0,
                 compile: bool = False):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.label_names = list(labels)
        self.max_tokens = max_tokens
        self.device = device
        self.batch_size = batch_size
        self.model_version = model_version
        self.temperature = float(temperature)
        self.stats = TokenStats()
        self.forward_stats = ForwardStats(compiled=compile)
        self.forward = model
        # The shapes a compiled forward pads to, and how many it can meet (one compile each).
        self.lengths, self.rows = length_buckets(max_tokens), row_buckets(batch_size)
        self.max_shapes = len(self.lengths) * len(self.rows)
        if compile:
            import torch._dynamo

            # Past this many recompiles of one frame dynamo would silently fall back to eager.
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, self.max_shapes)
            from accelerate.utils import compile_regions

            log.info("compiling the forward (Inductor cache %s) for at most %d shapes: lengths %s x rows %s",
                     use_node_compile_cache(), self.max_shapes, self.lengths, self.rows)
            # Regional compilation (accelerate's compile_regions, the recipe of torch's "regional
            # compilation" tutorial): the repeated decoder layer is compiled once and its code reused
            # by every layer, so a compile costs about one layer's, not 32 layers unrolled (a tiny
            # 8-layer Mistral on 2 CPU cores: 47 s instead of 97 s for 3 shapes). Static shapes:
            # each bucket gets kernels of its own size.
            self.forward = compile_regions(model, dynamic=False)

    @classmethod
    def load(cls, artifact: str | Artifact, device: str | None = None, batch_size: int = SCORING_BATCH_SIZE,
             backbone: str | None = None, compile: str | None = None, merge_lora: bool = True) -> "Predictor":
        """Load a verified artifact. `backbone` overrides where the base weights are read from
        (a node-local copy, or a pre-quantized copy the artifact approves); its content must still
        be what the manifest names (backbone_for). `compile` ('auto', 'on', 'off') overrides the
        artifact's model.compile for this scorer, as `device` overrides model.device. `merge_lora`
        False keeps the adapters apart (the bench measures what merging saves)."""
        art = artifact if isinstance(artifact, Artifact) else open_artifact(artifact)
        cfg = art.config()
        hw = resolve_hardware(cfg.model, device)
        source = backbone_for(art, backbone)
        tokenizer = load_tokenizer(str(art.path / "tokenizer"), cfg.model.max_tokens)
        model = build_classifier(cfg, source, tokenizer, hw, for_training=False)
        try:
            load_trainable_state(model, art.adapter_state())
        except ConfigError as exc:
            raise ArtifactError(f"{art.path / 'adapter.safetensors'} (model {art.model_version}): {exc}") from exc
        merged = prepare_for_scoring(model, hw, merge_lora)
        compiled = use_compile(compile or cfg.model.compile, hw.device)
        log.info("loaded model %s on %s (LoRA %s, forward %s)", art.model_version, hw.describe(),
                 f"merged into {merged} projections" if merged else "unmerged", "compiled" if compiled else "eager")
        temperature = float(art.manifest.get("calibration", {}).get("temperature", 1.0))  # 1.0: made before calibration
        predictor = cls(model, tokenizer, art.labels, cfg.model.max_tokens, hw.device, batch_size, art.model_version,
                        temperature, compile=compiled)
        predictor.forward_stats.merged_lora = merged
        return predictor

    @torch.inference_mode()
    def predict(self, texts: list[str]) -> Predictions:
        started = time.perf_counter()
        fs = self.forward_stats
        texts = list(texts)
        probabilities = np.zeros((len(texts), len(self.label_names)), dtype=np.float32)
        for idx, batch in self.batches(texts):
            batch = {k: v.to(self.device) for k, v in batch.items()}
            shape = tuple(batch["input_ids"].shape)
            forward = time.perf_counter()
            logits = self.forward(**batch).logits[:len(idx)].float()
            probabilities[idx] = torch.softmax(logits / self.temperature, dim=-1).cpu().numpy()
            seconds = time.perf_counter() - forward
            fs.forward_s += seconds
            if shape not in fs.shapes:
                fs.shapes[shape] = seconds
                if fs.compiled:
                    log.info("compiled the forward for %d rows x %d tokens in %.1fs (shape %d of at most %d)",
                             *shape, seconds, len(fs.shapes), self.max_shapes)
        label_ids = probabilities.argmax(-1)
        fs.calls += 1
        fs.rows += len(texts)
        fs.total_s += time.perf_counter() - started
        return Predictions(
            labels=[self.label_names[i] for i in label_ids],
            label_ids=label_ids,
            confidence=probabilities[np.arange(len(texts)), label_ids] if texts else np.zeros(0, np.float32),
            probabilities=probabilities,
        )

    def batches(self, texts: list[str]):
        """(row indices, tokenized batch) per forward pass, as `predict` runs them: texts sorted by
        token length, cut into batches of batch_size, each padded on the right to its longest row
        (compiled: to buckets). The texts are tokenized once, for their lengths and their ids
        alike (the ids clf_core.model.batching.encode_batch gives, tested); only the rows longer than
        max_tokens are encoded again, with the tokenizer's own truncation (which keeps a closing
        special token such as BERT's [SEP]). Tokenizing time and token counts go to forward_stats
        and stats."""
        if not texts:
            return
        started = time.perf_counter()
        ids = self.tokenizer(texts, add_special_tokens=True)["input_ids"]
        lengths = [len(row) for row in ids]
        long = [i for i, n in enumerate(lengths) if n > self.max_tokens]
        if long:
            cut = self.tokenizer([texts[i] for i in long], truncation=True, max_length=self.max_tokens)["input_ids"]
            for i, row in zip(long, cut):
                ids[i] = row
        order = np.argsort(lengths, kind="stable")
        self.forward_stats.tokenize_s += time.perf_counter() - started
        pad = self.tokenizer.pad_token_id
        for start in range(0, len(texts), self.batch_size):
            idx = order[start:start + self.batch_size]
            rows = [ids[i] for i in idx]
            width = max(len(row) for row in rows)
            input_ids = np.full((len(rows), width), pad, dtype=np.int64)
            mask = np.zeros((len(rows), width), dtype=np.int64)
            for r, row in enumerate(rows):
                input_ids[r, :len(row)] = row
                mask[r, :len(row)] = 1
            batch = {"input_ids": torch.from_numpy(input_ids), "attention_mask": torch.from_numpy(mask)}
            stats = TokenStats(texts=len(rows), truncated=sum(1 for i in idx if lengths[i] > self.max_tokens),
                               real_tokens=int(mask.sum()), padded_tokens=int(mask.size),
                               longest=max(lengths[i] for i in idx))
            if self.forward_stats.compiled:
                batch, stats.padded_tokens = self.padded_to_buckets(batch)
            self.stats.add(stats)
            yield idx, batch

    def padded_to_buckets(self, batch: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], int]:
        """The batch padded on the right to a bucketed length (pad id, mask 0: every real token keeps
        its position, and the head reads the last real token), then to a bucketed row count with
        copies of its first row (their outputs are dropped). Returns it and the tokens it computes."""
        rows, length = batch["input_ids"].shape
        to_length, to_rows = bucket(length, self.lengths), bucket(rows, self.rows)
        pads = {"input_ids": self.tokenizer.pad_token_id, "attention_mask": 0}
        out = {}
        for key, value in batch.items():
            value = torch.nn.functional.pad(value, (0, to_length - length), value=pads.get(key, 0))
            out[key] = torch.cat([value, value[:1].expand(to_rows - rows, -1)]) if to_rows > rows else value
        return out, to_rows * to_length


def prepare_for_scoring(model, hw: Hardware, merge_lora: bool = True) -> int:
    """A freshly loaded model made ready to score only (never to train): no KV cache, and the LoRA
    adapters folded into their projections (clf_core.model.build.merge_lora_for_scoring) unless
    `merge_lora` is False. Returns the number of projections merged."""
    # Scoring never generates: without a KV cache each layer's keys and values are neither copied
    # nor kept alive until the forward ends, and every decoder layer runs the same code (the cache
    # update is what made each layer's compiled graph differ by its index).
    model.get_base_model().config.use_cache = False
    return merge_lora_for_scoring(model, hw) if merge_lora else 0


def backbone_for(art: Artifact, override: str | None = None) -> str:
    """The local directory of the backbone `art` was trained on (or `override`), checked by content.

    The check is never skipped. A clf-artifact/2 manifest names the backbone by the sha256 of its
    files and lists the pre-quantized copies its publisher approved; anything else is refused,
    whatever a `prequantized.json` inside the directory claims (it sits beside the weights it would
    vouch for, so it proves nothing). A clf-artifact/1 artifact recorded a fingerprint of headers
    and sizes only: that is checked (a warning says the weights themselves are not), and one that
    recorded none (trained on a hub id not yet downloaded) is refused, as nothing could prove its
    backbone.
    """
    entry = art.manifest["backbone"]
    where = override or entry["id"]
    # The recorded revision pins the hub snapshot of the id the model was trained on.
    revision = None if override else entry.get("revision")
    if art.format_version == 1:
        expected = entry.get("sha256")
        if not expected:
            raise ArtifactError(
                f"model {art.model_version} ({art.path}) is a clf-artifact/1 artifact that recorded no backbone "
                f"fingerprint (trained on {entry['id']!r}), so nothing can show that {where!r} is its backbone. "
                f"Re-train it with this clf_core: clf-artifact/2 names the backbone by the sha256 of its files."
            )
        source = resolve_backbone(where, revision=revision)
        actual = header_fingerprint(source)["sha256"]
        if actual != expected:
            raise ArtifactError(
                f"backbone at {source} (fingerprint {str(actual)[:12]}) is not the one model {art.model_version} "
                f"was trained on (fingerprint {expected[:12]}, {entry['id']}). Point --backbone at the original "
                f"weights (a clf-artifact/1 artifact cannot use a pre-quantized copy)."
            )
        log.warning("model %s is a clf-artifact/1 artifact: its backbone is checked by file headers and sizes only, "
                    "not weight by weight. Re-train to get a clf-artifact/2 artifact, which names it by content.",
                    art.model_version)
        return source
    approved = tuple(entry.get("prequantized", []))
    source = resolve_backbone(where, accepted=(entry["sha256"], *approved), revision=revision)
    actual = backbone_fingerprint(source)
    if actual["sha256"] == entry["sha256"] or actual["sha256"] in approved:
        return source
    if (Path(source) / PREQUANTIZED_META).is_file():
        detail = (f"It is a pre-quantized copy this artifact does not approve; its publisher can approve it "
                  f"with clf_core.model.prequantize.approve(<artifact URI>, {source!r}).")
    else:
        recorded = entry.get("files", {})
        differ = sorted(n for n in set(recorded) | set(actual["files"]) if recorded.get(n) != actual["files"].get(n))
        detail = f"Files that differ: {differ[:5]}. Point --backbone at the original weights."
    raise ArtifactError(
        f"backbone at {source} (content sha256 {actual['sha256'][:12]}) is not the one model {art.model_version} "
        f"was trained on (sha256 {entry['sha256'][:12]}, {entry['id']}). {detail}"
    )
