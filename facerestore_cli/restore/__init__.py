"""Restoring the faces of photos and videos: what `facerestore restore` runs.

options        the settings of a run, parsed and checked before any model loads (keyword dataclasses)
face_restorer  the model and detector loaded once; frames in, restored frames out
lazy           the face restorer of a run, loaded when the first file needs it
frames         the numpy and tensor (model's device) frame paths: warp, restore, paste back
loop           the file loop: photos in groups, videos in chunks, per-file errors, summary
report         the run's summary, per-input records (--report JSONL) and progress protocol
shards         several processes under torchrun, one GPU each
threads        video decoding ahead and encoding behind the restorer
"""
