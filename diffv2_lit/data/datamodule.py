"""`TokenDataModule`: prepared LitData token folders -> (input_ids, targets) batches for training.

Training streams `StreamingDataset(TokensLoader(block_size=seq_len + 1))` through a
`StreamingDataLoader`: LitData shards chunks per rank (from the distributed environment) and per
worker, shuffles with `seed`, and its loader is stateful, so Lightning stores the loader position in
every checkpoint (`loops.fit_loop.state_dict.combined_loader`) and a resumed run continues with
exactly the next batch. Do not call `trainer.estimated_stepping_batches` before the checkpoint is
restored (e.g. in `configure_optimizers`): it builds the loaders early and silently skips that
restore (Lightning #20550).

Validation reads a fixed budget of `val_tokens` tokens: the first blocks of each validation split,
in order, through a plain map-style DataLoader, so every validation run sees the same tokens.

Several folders can be mixed with weights (`mix`), sampled per sequence by
`CombinedStreamingDataset(..., weights, iterate_over_all=False)`; an epoch ends when one source
runs out.

A source can also be an `s3://bucket/prefix` written by `diffv2-lit prepare --output s3://...`:
LitData streams its chunks into `cache_dir` (see `remote.py` for endpoints, credentials and checks).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_warn
import litdata
from litdata import CombinedStreamingDataset, StreamingDataLoader, StreamingDataset
from torch.utils.data import ConcatDataset, DataLoader, Dataset, DistributedSampler, Subset

from diffv2_lit.data.corpus import builtin_name, is_builtin
from diffv2_lit.data.errors import DataError, DataSettingError
from diffv2_lit.data.folder import DataFolder, LocalFolder, check_chunks, count_blocks, open_folder
from diffv2_lit.data.prepare import METADATA_FILE, PrepareError, prepare
from diffv2_lit.data.writer import NoSpaceError
from diffv2_lit.data.remote import check_url, clean_cache, is_url, open_remote_folder
from diffv2_lit.data.tokenizer import TokenizerError, load_tokenizer

IGNORE_INDEX = -100


def cache_root() -> Path:
    """Where built-in corpora are prepared: $DIFFV2_LIT_CACHE, else ~/.cache/diffv2-lit."""
    return Path(os.environ.get("DIFFV2_LIT_CACHE", "~/.cache/diffv2-lit")).expanduser()


def default_remote_cache() -> Path:
    """Where chunks streamed from object storage are cached: $DIFFV2_LIT_CACHE/remote."""
    return cache_root() / "remote"


def ensure_builtin(spec: str, tokenizer: str = "byte") -> Path:
    """Prepare a `builtin:` corpus once into the cache (atomic, so concurrent ranks are safe)."""
    ident = load_tokenizer(tokenizer).identity()
    target = cache_root() / "data" / f"{builtin_name(spec)}-{ident['name']}-{ident['hash'][:12]}"
    if (target / METADATA_FILE).is_file():
        return target
    # The first fit waits for this (seconds): say why, once.
    print(f"[data] first use of {spec}: preparing it with tokenizer {ident['name']!r} into {target} (once)", flush=True)
    try:
        # Small chunks (~0.5M tokens) so several DataLoader workers and ranks each get chunks.
        prepare([spec], target, tokenizer=tokenizer, chunk_bytes="1MB", num_workers=1, verbose=False, summary=False,
                command=f"TokenDataModule builtin {spec} tokenizer={tokenizer}")
    except NoSpaceError as err:  # prepare's advice names --output, which a fit has not got
        problem = str(err).removesuffix(": free space there or choose another --output")
        raise DataError(f"the cache cannot hold the built-in corpus {spec}: {problem}: free space there, or set "
                        "DIFFV2_LIT_CACHE to a folder on a larger disk") from None
    except PrepareError:
        if not (target / METADATA_FILE).is_file():  # not "another process finished first"
            raise
    return target


class ShiftTokens:
    """TokensLoader block of seq_len + 1 tokens -> (input_ids, targets) LongTensors of seq_len.

    With `pack=False` each sequence is cut at its first EOS: targets after it are IGNORE_INDEX,
    so no prediction ever uses context from a previous document (the cut-off tokens are wasted).

    With `document_mask=True` the block becomes (input_ids, targets, document_ids): the model keeps each
    query inside its document, and the target at each EOS input (the first token of the next document) is
    IGNORE_INDEX, as torchtitan does: that query sees only the document it ends, and a document run alone
    has no prediction of its first token either.
    """

    def __init__(self, eos_id: int | None, pack: bool = True, document_mask: bool = False):
        self.eos_id = eos_id
        self.pack = pack
        self.document_mask = document_mask and eos_id is not None

    def __call__(self, block) -> tuple[torch.Tensor, ...]:
        tokens = torch.from_numpy(np.asarray(block, dtype=np.int64))
        inputs, targets = tokens[:-1], tokens[1:].clone()
        if not self.pack and self.eos_id is not None:
            eos_at = (inputs == self.eos_id).nonzero()
            if len(eos_at):
                targets[int(eos_at[0]):] = IGNORE_INDEX
        if self.document_mask:
            targets[inputs == self.eos_id] = IGNORE_INDEX
            # Document ids as diffv2_lit.model.documents.document_ids counts them (the data may not import the
            # model): each EOS closes its document, the token after it opens the next.
            ends = (inputs == self.eos_id).long()
            return inputs, targets, ends.cumsum(0) - ends
        return inputs, targets


class TokensLoader(litdata.TokensLoader):
    """LitData's TokensLoader, checking a local chunk file against its index.json before every read.

    LitData memory-maps chunks: one truncated in place kills the reading process with SIGBUS (exit 135, no
    message), and one deleted makes it wait and end in a ChunkWaitTimeoutError whose hint says "not a missing
    object" (issue 24.12). One `stat` per block is cheap next to the block's copy. LitData accepts an item
    loader only under the class name its index.json records, hence the name.
    """

    def load_item_from_chunk(self, index, chunk_index, chunk_filepath, begin, filesize_bytes):
        expected = self._chunks[int(chunk_index)]["chunk_bytes"]
        try:
            size = os.stat(chunk_filepath).st_size
        except FileNotFoundError:
            raise DataError(f"chunk file {chunk_filepath} is missing (listed in index.json)") from None
        if size != expected:
            raise DataError(f"chunk file {chunk_filepath} is corrupt or truncated: {size} bytes on disk, index.json "
                            f"says {expected}")
        return super().load_item_from_chunk(index, chunk_index, chunk_filepath, begin, filesize_bytes)


class _Watched:
    """A loader whose batches are checked against the data the run started with (`watch`, a DataWatch): the
    data folder prepared again, a chunk deleted or truncated under the run, each stops it with one line."""

    watch: "DataWatch | None" = None

    def _watched(self, batches):
        try:
            for batch in batches:
                if self.watch is not None:
                    self.watch.unchanged()
                yield batch
        except Exception:
            if self.watch is not None:
                self.watch.diagnose()  # raises a DataError naming what changed, if anything did
            raise


class DataWatch:
    """What the run's local data folders were when it started, to notice them changing under it (issue 24.7).

    Checked before every batch is used: a `stat` of each folder's train/index.json and metadata file (prepare
    publishes a new folder by rename, so a re-prepared folder has new files). After a loader failure,
    `diagnose` also checks every chunk against its index.
    """

    def __init__(self, folders: list[DataFolder], trainer) -> None:
        self.folders, self.trainer = [f for f in folders if not f.is_remote], trainer
        self.stamps = {path: _stamp(path) for folder in self.folders for path in folder.watched_files()}

    def unchanged(self) -> None:
        for path, stamp in self.stamps.items():
            if _stamp(path) != stamp:
                folder = next(f for f in self.folders if path in f.watched_files())
                raise DataError(f"data folder {folder.root} was prepared again (or changed) while this run read it: "
                                f"{path} is not the one the run started with; stopped at step {self._step()} before "
                                f"training on other data. {self._advice(new_data=True)}")

    def diagnose(self) -> None:
        self.unchanged()
        redo = f"the data changed while this run read it (step {self._step()}). {self._advice(new_data=False)}"
        for folder in self.folders:
            place = LocalFolder(Path(folder.root))
            objects = place.list()
            for split, index in (("train", folder.train_index), ("val", folder.val_index)):
                if index is not None:
                    check_chunks(place, split, index, objects, redo)

    def _step(self) -> int:
        return self.trainer.global_step if self.trainer is not None else 0

    def _advice(self, new_data: bool) -> str:
        last = last_checkpoint(self.trainer)
        if last is None:
            return "No checkpoint was written before it: restore the data and start the run again."
        advice = f"Restore the data and resume with --ckpt_path {last} (the last good checkpoint)"
        return advice + (f", or train on the new data from its weights with --model.init_from {last}." if new_data
                         else ".")


def _stamp(path: Path) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


def last_checkpoint(trainer) -> str | None:
    """The newest checkpoint the run's ModelCheckpoint wrote (`training.module` has the same three lines; the data
    layer may not import it)."""
    callback = getattr(trainer, "checkpoint_callback", None)
    path = getattr(callback, "last_model_path", "") or getattr(callback, "best_model_path", "")
    return path or None


class PadToRanks(Dataset):
    """Validation blocks padded to a multiple of the rank count with blocks that count nothing.

    Lightning's DistributedSampler evens out the ranks by repeating the first blocks, so `val/loss`
    counted up to `ranks - 1` blocks twice and changed with the GPU count (issue 19.9). Here every rank
    still gets as many batches (the steps of validation stay in lockstep, as DDP and FSDP need), but the
    padding blocks' targets are all IGNORE_INDEX: the token-weighted loss sees each real block once.
    """

    def __init__(self, dataset, ranks: int):
        self.dataset = dataset
        self.length = math.ceil(len(dataset) / ranks) * ranks

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int):
        if index < len(self.dataset):
            return self.dataset[index]
        inputs, targets, *document_ids = self.dataset[0]
        return inputs, torch.full_like(targets, IGNORE_INDEX), *document_ids


class TrainLoader(_Watched, StreamingDataLoader):
    """The StreamingDataLoader for training, with two fixes for exact resume under Lightning.

    1. `num_batches` gives a weighted mix (`iterate_over_all=False`, which has no length) a fixed
       epoch length. Without one, Lightning pre-fetches a batch to detect the epoch end, so the
       loader state it saves is one batch ahead and a resumed run would skip a batch.
    2. After `load_state_dict`, LitData keeps `restore` set until an epoch runs to exhaustion, so
       when Lightning ends an epoch by count (as with a mix) the next epoch would replay the
       checkpoint's position. Once the restored epoch has produced a batch, the next `__iter__`
       must start a new epoch: clear the flag then. (It only steers the first worker indices,
       which are all queued before the first batch arrives.)
    """

    def __init__(self, dataset, *args, num_batches: int | None = None, **kwargs):
        super().__init__(dataset, *args, **kwargs)
        self.num_batches = num_batches

    def __len__(self) -> int:
        return self.num_batches if self.num_batches is not None else super().__len__()

    def __iter__(self):
        for batch in self._watched(super().__iter__()):
            self.restore = False
            yield batch

    def load_state_dict(self, obj: dict[str, Any]) -> None:
        super().load_state_dict(_follow_cache_dir(obj, self.dataset))


class ValLoader(_Watched, DataLoader):
    """The validation DataLoader, its batches checked like the training ones."""

    def __iter__(self):
        yield from self._watched(super().__iter__())


def _follow_cache_dir(obj: dict[str, Any], dataset) -> dict[str, Any]:
    """A checkpoint's loader state with each remote source's cache path set to where this run caches it.

    LitData records the local cache path of a remote dataset (`input_dir_path`) and refuses to resume
    when it differs ("The provided `input_dir` path state doesn't match"), so a run resumed with another
    `cache_dir` (or on a machine whose cache lives elsewhere) would fail. The URL identifies the data.
    """
    children = getattr(dataset, "_datasets", None) or [dataset]  # a CombinedStreamingDataset's sources
    cache_of = {d.input_dir.url: d.input_dir.path for d in children if getattr(d, "input_dir", None) and d.input_dir.url}
    states = obj.get("dataset") or {}
    for state in [states, *states.values()]:
        if isinstance(state, dict) and state.get("input_dir_url") in cache_of:
            state["input_dir_path"] = cache_of[state["input_dir_url"]]
    return obj


class TokenDataModule(L.LightningDataModule):
    """Token batches from `diffv2-lit prepare` folders (or the built-in corpus), resumable.

    Args:
        data_dir: a prepared folder, an `s3://bucket/prefix` written by `diffv2-lit prepare`, or
            `builtin:shakespeare` (prepared on first use into $DIFFV2_LIT_CACHE, default
            ~/.cache/diffv2-lit). Ignored when `mix` is set.
        mix: weighted sources, e.g. `[{path: data/web, weight: 0.7}, {path: s3://bucket/code, weight: 0.3}]`;
            weights are normalised, so they need only be >= 0 with a positive sum.
        seq_len: tokens per training sequence (blocks of seq_len + 1 are read for the shift).
        batch_size: sequences per device per step (the micro-batch).
        num_workers: DataLoader worker processes per device.
        seed: shuffling seed (LitData shuffles chunks and the blocks inside them).
        shuffle: shuffle the training stream.
        val_tokens: validation budget in target tokens, the same tokens every run (0: no validation).
        tokenizer: `byte` or a tokenizer.json path; must be the tokenizer the data was prepared with.
        pack: True packs documents across EOS into full sequences; False cuts each sequence at its
            first EOS (targets after it are -100).
        document_mask: True keeps each query inside its own document of a packed sequence (batches carry
            per-token document ids as a third tensor; the token after each EOS is not predicted).
        cache_dir: local folder for chunks streamed from s3:// sources (default $DIFFV2_LIT_CACHE/remote,
            i.e. ~/.cache/diffv2-lit/remote); node-local disk. Partial downloads of killed runs are removed
            at start. Unused for local folders, which are read in place.
        storage_options: for s3:// sources, keyword arguments of `boto3.client("s3", ...)` handed to
            LitData, e.g. `{endpoint_url: http://minio:9000, region_name: us-east-1}`. Leave credentials to
            the environment (AWS_ACCESS_KEY_ID, ...): this dict is saved with the config and checkpoints.
    """

    def __init__(
        self,
        data_dir: str = "builtin:shakespeare",
        mix: list[dict[str, Any]] | None = None,
        seq_len: int = 256,
        batch_size: int = 16,
        num_workers: int = 2,
        seed: int = 42,
        shuffle: bool = True,
        val_tokens: int = 65536,
        tokenizer: str = "byte",
        pack: bool = True,
        document_mask: bool = False,
        cache_dir: str | None = None,
        storage_options: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        # Checkpoints store these hyper-parameters and are loaded as data only: str, never pathlib objects.
        self.hparams.update(data_dir=os.fspath(data_dir), tokenizer=os.fspath(tokenizer))
        self.data_dir, self.seq_len, self.batch_size = data_dir, seq_len, batch_size
        self.num_workers, self.seed, self.shuffle, self.pack = num_workers, seed, shuffle, pack
        self.document_mask = document_mask
        self.val_tokens, self.tokenizer = val_tokens, tokenizer
        self.cache_dir, self.storage_options = cache_dir, dict(storage_options or {})
        self._check_numbers()
        self.sources, self.weights = self._parse_mix(data_dir, mix)
        for source in self.sources:
            if is_url(source):
                check_url(source)  # refuse gs://... now, not as a missing local folder later
        try:
            tok = load_tokenizer(tokenizer)
        except TokenizerError as err:
            raise DataSettingError(f"data.tokenizer: {err}") from None
        self.vocab_size: int = tok.vocab_size  # the data's vocabulary: setup() checks the data matches it
        self.tokenizer_identity: dict = tok.identity()
        self.eos_id: int = tok.eos_id
        self.folders: list[DataFolder] = []
        self._train_loader = None
        self._short_val_warned: set[str] = set()
        self._data_watch: DataWatch | None = None

    # ------------------------------------------------------------ argument checks

    def _check_numbers(self) -> None:
        for name in ("seq_len", "batch_size"):
            if getattr(self, name) < 1:
                raise DataSettingError(f"data.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("num_workers", "val_tokens"):
            if getattr(self, name) < 0:
                raise DataSettingError(f"data.{name} must be >= 0, got {getattr(self, name)}")

    @staticmethod
    def _parse_mix(data_dir: str, mix: list[dict[str, Any]] | None) -> tuple[list[str], list[float]]:
        if not mix:
            return [str(data_dir)], [1.0]
        sources, weights = [], []
        for i, entry in enumerate(mix):
            if not isinstance(entry, dict) or "path" not in entry:
                raise DataSettingError(f"data.mix[{i}] must be a mapping with 'path' (and 'weight'), got {entry!r}")
            weight = float(entry.get("weight", 1.0))
            if not math.isfinite(weight) or weight < 0:
                raise DataSettingError(f"data.mix[{i}] ({entry['path']}): weight must be a finite number >= 0, got {weight}")
            sources.append(str(entry["path"]))
            weights.append(weight)
        if sum(weights) <= 0:
            raise DataSettingError(f"data.mix weights {weights} do not sum to a positive number; give at least one weight > 0")
        return sources, [w / sum(weights) for w in weights]

    # ------------------------------------------------------------ Lightning hooks

    def prepare_data(self) -> None:
        """Local rank 0 of each node: prepare built-in corpora, clean the remote cache of partial files."""
        for source in self.sources:
            if is_builtin(source):
                ensure_builtin(source, self.tokenizer)
        if any(is_url(s) for s in self.sources):
            clean_cache(self.remote_cache_dir)

    @property
    def remote_cache_dir(self) -> Path:
        return Path(self.cache_dir).expanduser() if self.cache_dir else default_remote_cache()

    def setup(self, stage: str | None = None) -> None:
        if self.folders:
            return
        folders = [self._open(s) for s in self.sources]
        for folder in folders:
            self._check_tokenizer(folder)
            self._check_length(folder)
        self.folders = folders

    def _open(self, source: str) -> DataFolder:
        if is_url(source):
            return open_remote_folder(source, self.storage_options)
        # Builtins are normally prepared by prepare_data; doing it here too keeps direct use simple.
        return open_folder(ensure_builtin(source, self.tokenizer) if is_builtin(source) else Path(source).expanduser())

    def _check_tokenizer(self, folder: DataFolder) -> None:
        if folder.meta is None:
            rank_zero_warn(f"{folder.root} has no {METADATA_FILE}: cannot check it was made with tokenizer "
                           f"{self.tokenizer!r}; assuming it was")
            return
        data_tok = folder.meta["tokenizer"]
        if data_tok["hash"] != self.tokenizer_identity["hash"]:
            raise DataError(
                f"tokenizer mismatch: {folder.root} was prepared with tokenizer {data_tok['name']!r} "
                f"(vocab {data_tok['vocab_size']}, sha256 {data_tok['hash'][:12]}), but data.tokenizer is "
                f"{self.tokenizer!r} (vocab {self.vocab_size}, sha256 {self.tokenizer_identity['hash'][:12]}); "
                "set data.tokenizer to the tokenizer the data was prepared with, or prepare the data again"
            )

    def _check_length(self, folder: DataFolder) -> None:
        blocks, tokens, largest = count_blocks(folder.train_index, self.seq_len + 1)
        if blocks < self.batch_size:
            raise DataError(
                f"data.seq_len={self.seq_len} with batch_size={self.batch_size} is more than {folder.train} can give: "
                f"it holds {tokens} tokens, largest chunk {largest} tokens, so only {blocks} sequence(s) of "
                f"{self.seq_len + 1} tokens (blocks never cross chunks); lower seq_len or batch_size, or prepare "
                "more data / bigger chunks (--chunk-bytes)"
            )

    # ------------------------------------------------------------ loaders

    def _streaming(self, folder: DataFolder, split_dir: Path | str, shuffle: bool):
        remote = {}
        if folder.is_remote:
            remote = dict(cache_dir=str(self.remote_cache_dir), storage_options=dict(self.storage_options))
        return StreamingDataset(
            # Remote chunks arrive in (and leave) the cache as LitData streams them: nothing to check there.
            str(split_dir), item_loader=(litdata.TokensLoader if folder.is_remote else TokensLoader)(
                block_size=self.seq_len + 1), shuffle=shuffle,
            seed=self.seed, transform=ShiftTokens(self._eos(folder), self.pack, self.document_mask), **remote,
        )

    def train_dataloader(self):
        self._require_setup()
        # Sources of weight 0 are never sampled: leave them out.
        used = [(f, w) for f, w in zip(self.folders, self.weights) if w > 0]
        datasets = [self._streaming(f, f.train, self.shuffle) for f, _ in used]
        kwargs = dict(batch_size=self.batch_size, num_workers=self.num_workers, pin_memory=torch.cuda.is_available(),
                      drop_last=True)  # every step a full batch, every rank the same number of steps
        if len(datasets) == 1:
            self._train_loader = TrainLoader(datasets[0], **kwargs)
        else:
            weights = [w for _, w in used]
            if self.num_workers > 0:
                rank_zero_warn(
                    "data.mix with data.num_workers > 0: LitData 0.2.76 cannot resume a mix exactly with "
                    "DataLoader workers (a resumed run sees different batches); set data.num_workers=0 for exact "
                    "resume (token blocks are memory-mapped, so loading in the main process is cheap)")
            mixed = CombinedStreamingDataset(datasets, seed=self.seed, weights=weights, iterate_over_all=False)
            self._train_loader = TrainLoader(mixed, num_batches=self._mix_epoch_batches(datasets, weights), **kwargs)
        self._train_loader.watch = self._watch()
        return self._train_loader

    def _watch(self) -> DataWatch:
        if self._data_watch is None:  # one record of the data, taken when the first loader is made
            self._data_watch = DataWatch(self.folders, self.trainer)
        return self._data_watch

    def _mix_epoch_batches(self, datasets, weights) -> int:
        # A mix ends its epoch when the first source runs out, after about min(len_i / w_i)
        # sequences (random). Cut the epoch 10% before that so its length is known and fixed.
        expected = min(len(d) / w for d, w in zip(datasets, weights))
        return max(1, int(0.9 * expected) // self.batch_size)

    def val_dataloader(self):
        self._require_setup()
        parts = self._val_parts()
        if not parts:
            return []
        # Map-style and sequential: the same blocks, in the same order, every time, split across the
        # data-parallel ranks without counting any block twice.
        dataset, sampler = ConcatDataset(parts), None
        ranks = self.trainer.distributed_sampler_kwargs if self.trainer is not None else None
        if ranks and ranks["num_replicas"] > 1:
            dataset = PadToRanks(dataset, ranks["num_replicas"])
            sampler = DistributedSampler(dataset, shuffle=False, **ranks)  # Lightning keeps a sampler of this type
        loader = ValLoader(dataset, batch_size=self.batch_size, shuffle=False, sampler=sampler,
                           num_workers=self.num_workers, pin_memory=torch.cuda.is_available())
        loader.watch = self._watch()
        return loader

    def _val_parts(self) -> list[Subset]:
        with_val = [(f, w) for f, w in zip(self.folders, self.weights) if f.val is not None and w > 0]
        if self.val_tokens == 0 or not with_val:
            if self.val_tokens:
                rank_zero_warn("no validation split in the data folder(s): validation is skipped")
            return []
        total_weight = sum(w for _, w in with_val)
        parts = []
        for folder, weight in with_val:
            wanted = math.ceil(self.val_tokens * weight / total_weight / self.seq_len)
            available, _, _ = count_blocks(folder.val_index, self.seq_len + 1)
            if available < wanted and str(folder.val) not in self._short_val_warned:
                self._short_val_warned.add(str(folder.val))  # once per run, not at every validation
                rank_zero_warn(f"data.val_tokens={self.val_tokens:,} is more than the validation split gives: "
                               f"{folder.val} holds {available * self.seq_len:,} target tokens at seq_len={self.seq_len} "
                               f"(its share: {wanted * self.seq_len:,}); validating on all of them. Lower "
                               "data.val_tokens, or prepare with a larger --val-fraction / --val-tokens")
            if min(wanted, available) > 0:
                dataset = self._streaming(folder, folder.val, shuffle=False)
                parts.append(Subset(dataset, range(min(wanted, available))))
        return parts

    def _eos(self, folder: DataFolder) -> int:
        return folder.eos_id if folder.eos_id is not None else self.eos_id

    def _require_setup(self) -> None:
        if not self.folders:
            raise RuntimeError("TokenDataModule.setup() must run before asking for dataloaders")

    # ------------------------------------------------------------ checkpoint

    def state_dict(self) -> dict[str, Any]:
        # The loader position itself is saved by Lightning's fit loop (the StreamingDataLoader is
        # stateful). This records what the position means, to warn when a resume changes it, and which
        # data it is a position in (each folder's fingerprint), to refuse resuming on other data.
        return {"sources": self.sources, "weights": self.weights, "seq_len": self.seq_len,
                "batch_size": self.batch_size, "seed": self.seed, "shuffle": self.shuffle, "pack": self.pack,
                "tokenizer_hash": self.tokenizer_identity["hash"], "num_workers": self.num_workers,
                "world_size": self.trainer.world_size if self.trainer is not None else 1,
                "data": {source: {"fingerprint": folder.fingerprint(), "description": folder.describe()}
                         for source, folder in zip(self.sources, self.folders)}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        data = state_dict.pop("data", None)
        if data is not None and self.trainer is not None and self.trainer.state.fn == "fit":
            self._refuse_other_data(data)  # validate/test may evaluate a checkpoint on any data
        current = self.state_dict()
        restriped = {k: (v, current.get(k)) for k, v in state_dict.items() if k in _RESTRIPED and current.get(k) != v}
        if restriped and len(self.sources) > 1:
            key, (then, now) = next(iter(restriped.items()))
            raise DataError(f"{_DATA_KEYS[key]} is {now!r} but the checkpoint's was {then!r}: LitData resumes a weighted "
                            f"mix (data.mix) only with the checkpoint's data.batch_size, data.num_workers and device "
                            f"count; set it back to {then!r} to resume")
        reordered = [k for k in _REORDERED if k in state_dict and current.get(k) != state_dict[k]]
        if reordered and self.trainer is not None and self.trainer.state.fn == "fit":
            key = reordered[0]
            checkpoint = getattr(self.trainer, "ckpt_path", None) or "CHECKPOINT"
            raise DataError(f"{_DATA_KEYS[key]} is {current.get(key)!r} but {checkpoint} was trained with {state_dict[key]!r}: "
                            f"its data position means other sequences now; set {_DATA_KEYS[key]} back to "
                            f"{state_dict[key]!r} to resume, or start a new run from its weights with "
                            f"--model.init_from {checkpoint}")
        # One source: LitData restripes its position by samples, so these continue exactly (issue 19.15).
        changed = [f"{_DATA_KEYS.get(k, k)}: checkpoint {v!r}, now {current.get(k)!r}"
                   for k, v in state_dict.items() if current.get(k) != v and k not in _RESTRIPED + _REORDERED]
        if changed:
            rank_zero_warn(f"resuming with different data settings ({'; '.join(changed)}): the data stream "
                           "will not continue exactly where the checkpoint left it")

    def _refuse_other_data(self, recorded: dict[str, dict]) -> None:
        """The checkpoint's loader position is a position in the data it was trained on: on other data (prepared
        again, or replaced) it would silently mean other sequences, or fail in LitData (issue 24.7)."""
        key = "data.data_dir" if len(self.sources) == 1 else "data.mix source"
        checkpoint = getattr(self.trainer, "ckpt_path", None) or "CHECKPOINT"
        for source, folder in zip(self.sources, self.folders):
            then = recorded.get(source)
            if then is not None and then["fingerprint"] != folder.fingerprint():
                raise DataError(
                    f"{key} {source} is not the data {checkpoint} was trained on (prepared again or replaced since: "
                    f"then {then['description']}, now {folder.describe()}); resume on the data it was trained on, "
                    f"or train on this data from its weights in a new run with --model.init_from {checkpoint}")


# How each recorded setting is called in the YAML (tokenizer_hash: the tokenizer's sha256).
_DATA_KEYS = {"sources": "data.data_dir / data.mix", "weights": "data.mix weights", "seq_len": "data.seq_len",
              "batch_size": "data.batch_size", "seed": "data.seed", "shuffle": "data.shuffle",
              "tokenizer_hash": "data.tokenizer (sha256)", "num_workers": "data.num_workers",
              "world_size": "the device count (trainer.devices x trainer.num_nodes)", "pack": "data.pack"}
# Settings that change which sequences a loader position stands for: a resume with another one is refused
# (LitData would fail on another seq_len with a traceback, and continue another seed's order silently).
_REORDERED = ("seq_len", "seed", "shuffle", "pack")
# Settings a single source's loader position survives exactly: LitData 0.2.76 counts the samples seen over all
# ranks and workers and cuts the rest of the epoch anew (a weighted mix it refuses to restripe).
_RESTRIPED = ("batch_size", "num_workers", "world_size")
