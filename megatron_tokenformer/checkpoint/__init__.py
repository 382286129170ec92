"""Checkpoints: layout-independent, atomic, verified, read without unpickling.

Layout of `checkpoint.dir`:
    step_00000100/            one complete checkpoint
        meta.json             step, data position, optimizer step, LR schedule, engine counters,
                              the resolved config, the tokenizer's sha256, the layout that wrote it
        layer_LLL-tpTT-dpDD.safetensors   layer LLL (`model.layers()`: 0 embedding, 1..L blocks, L+1
                              final norm) of tensor shard TT, the piece data-parallel rank DD wrote
                              (format 3): each parameter by its global name (fp32 master weight), its
                              Adam moments as `exp_avg/<name>` and `exp_avg_sq/<name>`, each a flat
                              range of the tensor shard; in the metadata each range's offset, each
                              parameter's shard shape and partition dim, each Pattention's tau.
                              The pieces of a shard tile it (ZeRO partitions, or 1/D ranges); any
                              number of them reads back. Format 2 (still read) had one file per
                              layer and tensor shard, `layer_LLL-tpTT.safetensors`, whole shards.
        rng-RRRRR.safetensors the RNG state of global rank RRRRR (restored when the layout is the same)
        tokenizer.model|.json the training data's tokenizer (meta.json "tokenizer": file, sha256), so the
                              checkpoint alone suffices to evaluate or generate
        manifest.json         size and sha256 of every file
    step_00000200.partial/    one being written (never loaded); a background save
                              (checkpoint.async_save) also holds each rank's done-RRRRR.json
                              there until rank 0 commits
    latest                    name of the newest complete checkpoint (informational; resume scans)

Nothing in reading a checkpoint depends on the data-parallel size, the ZeRO stage or the pipeline
cut (the pieces are addressed by offset, whatever wrote them): a parameter's shard is re-sliced
from the tensor shards on load (docs/DESIGN.md section 7), so a run saved at (tensor a, pipeline b,
data c, ZeRO z) resumes at any other layout with its weights, Adam moments, step, LR schedule and
data position. At the same layout it continues bit-exactly.

The package's modules, one job each:
    files.py      the format: names, layer files, meta.json, reading any slice of a global tensor
    integrity.py  manifest, verification, the one atomic writer of checkpoint directories, which
                  checkpoint to use
    reader.py     offline reads of a whole checkpoint as global tensors (`load_model`, export, growth)
    save_load.py  saving from and loading into a running DeepSpeed engine (the only engine side)
Growth, export and conversion use the first three only; this module re-exports their public names.
"""
from .files import FORMAT_VERSION, CheckpointError, read_meta, tag_for
from .integrity import newest_good, resolve, verify, write_manifest
from .reader import checkpoint_tokenizer, global_state, global_state_dict, load_model

__all__ = ["FORMAT_VERSION", "CheckpointError", "read_meta", "tag_for", "newest_good", "resolve", "verify",
           "write_manifest", "global_state", "global_state_dict", "load_model", "checkpoint_tokenizer"]
