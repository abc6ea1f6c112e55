"""Files in and out: finding inputs, images, videos with their audio, and atomic outputs.

inputs        files, folders and globs the user names, and where each one's output goes
images        reading and writing images (alpha, grey, EXIF and ICC kept)
video         probing and reading videos as RGB uint8 frames (ffmpeg from imageio-ffmpeg)
video_writer  writing frames to a video with the input's audio copied back in
files         atomic outputs and `MediaError`, the one-line error of a bad file
tensors       uint8 images <-> [0, 1] tensors for data, metrics and rewards
"""
