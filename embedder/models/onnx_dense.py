"""An ONNX Runtime backend for sentence-transformers encoders with mean pooling (MiniLM, e5, ...).

The model is exported once with torch's dynamo exporter (needs the optional
``onnx`` and ``onnxscript`` packages) into a cache directory keyed by the model
files' digest; ``onnx-int8`` adds dynamic int8 weight quantisation. Inference
needs only onnxruntime (a fastembed dependency) and the tokenizer.
"""

from __future__ import annotations

import inspect
import json
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from embedder.errors import ModelUnavailableError
from embedder.models.registry import ResolvedModel

ONNX_BACKENDS = ("onnx", "onnx-int8")
_SESSIONS: dict[tuple[str, str], Any] = {}
_LOCK = threading.Lock()


# The transformer inputs an export may take, in its argument order.
_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def _model_digest(model_dir: Path) -> str:
    # From content: new weights in the same directory must never be served from an old export.
    from embedder.models.fingerprint import model_fingerprint

    return model_fingerprint(model_dir)[:16]


def _check_pooling(model_dir: Path) -> None:
    """The ST pooling must be plain mean pooling."""
    modules = json.loads((model_dir / "modules.json").read_text()) if (model_dir / "modules.json").is_file() else []
    pooling = next((m for m in modules if m.get("type", "").endswith("Pooling")), None)
    if pooling is not None:
        cfg = json.loads((model_dir / pooling["path"] / "config.json").read_text())
        # Newer sentence-transformers save one "pooling_mode"; earlier versions a flag per mode.
        if "pooling_mode" in cfg:
            mean_only = cfg["pooling_mode"] in ("mean", "mean_tokens")
        else:
            mean_only = {k for k, v in cfg.items() if k.startswith("pooling_mode_") and v is True} \
                == {"pooling_mode_mean_tokens"}
        if not mean_only:
            raise ModelUnavailableError(f"the ONNX backend supports mean pooling only; {model_dir} uses another")


def _max_length(model_dir: Path, tokenizer: Any) -> int:
    """The sequence length limit the sentence-transformers model applies.

    Its own setting where the dir has one (sentence-transformers 6 no longer writes it), else the tokenizer's;
    never beyond the positions the transformer has.
    """
    st_cfg = model_dir / "sentence_bert_config.json"
    own = json.loads(st_cfg.read_text()).get("max_seq_length") if st_cfg.is_file() else None
    tok_max = getattr(tokenizer, "model_max_length", None)
    limit = int(own) if own else int(tok_max) if tok_max and tok_max < 1_000_000 else 512
    cfg = model_dir / "config.json"
    positions = json.loads(cfg.read_text()).get("max_position_embeddings") if cfg.is_file() else None
    return min(limit, int(positions)) if positions else limit


def export_onnx(model_dir: Path, cache_dir: Path, backend: str) -> Path:
    """Export (once) the transformer of a sentence-transformers dir to ONNX; return the .onnx path.

    Raises:
        ModelUnavailableError: If the export tools are missing or the export fails.
    """
    target = cache_dir / _model_digest(model_dir)
    fp32 = target / "model.onnx"
    out = target / ("model_int8.onnx" if backend == "onnx-int8" else "model.onnx")
    if out.is_file():
        return out
    target.mkdir(parents=True, exist_ok=True)
    if not fp32.is_file():
        try:
            import onnx  # noqa: F401 - the exporter needs it
            import onnxscript  # noqa: F401
        except ImportError as exc:
            raise ModelUnavailableError(
                "the ONNX dense backend needs the export tools once: pip install 'prefect-embedder[onnx]'"
            ) from exc
        import torch
        from transformers import AutoModel, AutoTokenizer

        model = AutoModel.from_pretrained(model_dir).eval()
        tok = AutoTokenizer.from_pretrained(model_dir)

        sample = tok(["an example sentence", "another, longer example sentence"], padding=True, return_tensors="pt")
        # Only what the model takes: MPNet models take no token type ids. A model that takes them gets
        # explicit zeros when its tokenizer gives none, so their shape follows the batch's in the export.
        accepted = inspect.signature(model.forward).parameters
        names = [n for n in _INPUTS if n in accepted]
        if "token_type_ids" in names and "token_type_ids" not in sample:
            sample["token_type_ids"] = torch.zeros_like(sample["input_ids"])

        class _Encoder(torch.nn.Module):
            def __init__(self, inner: Any) -> None:
                super().__init__()
                self.inner = inner

            def forward(self, *inputs: Any) -> Any:
                return self.inner(**dict(zip(names, inputs))).last_hidden_state

        batch = torch.export.Dim("batch", min=1, max=4096)
        seq = torch.export.Dim("seq", min=2, max=int(model.config.max_position_embeddings))
        tmp = target / "model.onnx.tmp"
        # eval(): the wrapper itself must be in inference mode too, or the exporter traces it as training.
        wrapper = _Encoder(model).eval()
        torch.onnx.export(wrapper, tuple(sample[n] for n in names), str(tmp), input_names=names,
                          output_names=["last_hidden_state"],
                          # One entry for forward's *inputs, holding one spec per input.
                          dynamic_shapes=(tuple({0: batch, 1: seq} for _ in names),), dynamo=True,
                          external_data=False)
        tmp.replace(fp32)
    if backend == "onnx-int8" and not out.is_file():
        from onnxruntime.quantization import QuantType, quantize_dynamic

        tmp = target / "model_int8.onnx.tmp"
        quantize_dynamic(str(fp32), str(tmp), weight_type=QuantType.QInt8)
        tmp.replace(out)
    return out


class OnnxDenseEncoder:
    """Drop-in for :class:`~embedder.models.dense.DenseEncoder` on ONNX Runtime (CPU)."""

    precision = "fp32"
    asymmetric = False

    def __init__(self, resolved: ResolvedModel, cache_dir: Path, backend: str = "onnx") -> None:
        if backend not in ONNX_BACKENDS:
            raise ValueError(f"backend must be one of {ONNX_BACKENDS}")
        self.resolved = resolved
        self.cache_dir = cache_dir
        self.backend = backend
        self.device = "cpu"
        self._session: Any = None
        self._tokenizer: Any = None
        self._max_len = 512
        self._dim: int | None = None

    @property
    def name(self) -> str:
        """The registry name (or local path) of the model."""
        return self.resolved.spec.name

    def load(self) -> Any:
        """Export if needed and open the session once per process."""
        if self._session is not None:
            return self._session
        model_dir = Path(self.resolved.location)
        if not model_dir.is_dir():
            raise ModelUnavailableError(f"the ONNX backend needs a local model directory, not {self.resolved.location}")
        _check_pooling(model_dir)
        from transformers import AutoTokenizer

        self._tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self._max_len = _max_length(model_dir, self._tokenizer)
        key = (str(model_dir), self.backend)
        with _LOCK:
            if key not in _SESSIONS:
                import onnxruntime as ort

                try:
                    path = export_onnx(model_dir, self.cache_dir, self.backend)
                except ModelUnavailableError:
                    raise
                except Exception as exc:
                    raise ModelUnavailableError(f"ONNX export of {self.name!r} failed: {exc}") from exc
                _SESSIONS[key] = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            self._session = _SESSIONS[key]
        return self._session

    @property
    def dim(self) -> int:
        """Embedding dimension (probed once: the stage asks for it every batch)."""
        if self._dim is None:
            self._dim = int(self.encode_documents(["dimension probe"]).shape[1])
        return self._dim

    def encode_queries(self, texts: Sequence[str]) -> np.ndarray:
        """As :meth:`encode_documents`: the model embeds queries and documents alike."""
        return self.encode_documents(texts)

    def encode_documents(self, texts: Sequence[str]) -> np.ndarray:
        """Mean-pooled, L2-normalised float32 rows (as the sentence-transformers model computes them)."""
        session = self.load()
        enc = self._tokenizer(list(texts), padding=True, truncation=True, max_length=self._max_len,
                              return_tensors="np")
        feed = {i.name: enc.get(i.name, np.zeros_like(enc["input_ids"])).astype(np.int64)
                for i in session.get_inputs()}
        hidden = session.run(None, feed)[0]
        mask = enc["attention_mask"][..., None].astype(np.float32)
        pooled = (hidden * mask).sum(axis=1) / np.clip(mask.sum(axis=1), 1e-9, None)
        norms = np.linalg.norm(pooled, axis=1, keepdims=True)
        unit: np.ndarray = (pooled / np.clip(norms, 1e-12, None)).astype(np.float32)
        return unit
