"""Face data for ADD: the potential manipulation region's ground truth and the faces.

- FaceFinder: a light face detector and its facial keypoints (dlib's HOG detector, 68 landmarks).
- hull_mask: M_i, 1 inside the convex hull of the keypoints and 0 outside (Sec. III-C).
- crop_face, read_faces: the face region cropped and resized to 256x256 (Sec. IV-B).
Below the divider: reading inputs; FaceForensics++ and Celeb-DF as their owners lay them out (Sec.
IV-A); the preparation into PNG crops, masks and a manifest; the built-in synthetic faces; what the
five scripts share (one-line errors, the argument parser, atomic writes: here, without torch, so
that a preparation worker starts fast and small); the CLI.

    python masks.py --data ff++ --src ~/FaceForensics++  # -> data/ff++/{faces,masks,manifest.csv}
    python masks.py --data celeb-df --src ~/Celeb-DF-v2  # -> data/celeb-df/...
"""
import argparse
import collections
import contextlib
import csv
import errno
import functools
import glob
import importlib.util
import io
import json
import math
import multiprocessing
import os
import re
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from typing import NamedTuple

import av
import dlib
import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageOps, UnidentifiedImageError
from scipy.spatial import ConvexHull


FFPP_METHODS = ("Deepfakes", "Face2Face", "FaceSwap", "NeuralTextures")
CELEBDF_REAL, CELEBDF_FAKE = ("Celeb-real", "YouTube-real"), "Celeb-synthesis"
SYNTHETIC_METHODS = ("swap", "mouth", "gan")
METHODS = {"ff++": FFPP_METHODS, "celeb-df": (CELEBDF_FAKE,), "synthetic": SYNTHETIC_METHODS}
SPLITS = ("train", "val", "test")
# an input that cannot be read (now)
READ_ERRORS = (av.FFmpegError, OSError, UnidentifiedImageError)
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
# px: faces are detected on a copy of at most this size (HOG on a full 1080p frame is ~4x slower)
DETECT_SIZE = 640
CROP_SIZE = 256  # px: the face crops (Sec. IV-B: 256x256)


# ----------------------------------------------------------------------------------------------
# 1) Landmarks, the hull mask (Sec. III-C) and the face crop (Sec. IV-B)

class Face(NamedTuple):
    box: tuple  # (x0, y0, x1, y1) of the detection, in image pixels
    landmarks: np.ndarray  # (68, 2) x, y in dlib's index layout


class FaceFinder:
    """dlib's HOG face detector at upsample 0 (faces of ~80 px and up) on a copy of at most
    DETECT_SIZE px, boxes mapped back; the 68 landmarks are then found at full resolution."""
    def __init__(self):
        # dlib's 68-point model (found: importing needs pkg_resources)
        spec = importlib.util.find_spec("face_recognition_models")
        if spec is None:
            raise InputError(
                "the 68-point landmark model is missing: pip install face-recognition-models")
        self.detector = dlib.get_frontal_face_detector()
        self.predictor = dlib.shape_predictor(os.path.join(spec.submodule_search_locations[0],
                                                           "models",
                                                           "shape_predictor_68_face_landmarks.dat"))

    @staticmethod
    def small(image):
        """A gray copy of at most DETECT_SIZE px and its scale (video frames bring their own)."""
        scale = min(1.0, DETECT_SIZE / max(image.shape[:2]))
        gray = Image.fromarray(image).convert("L")
        size = (round(image.shape[1] * scale), round(image.shape[0] * scale))
        return np.asarray(gray.resize(size, Image.BILINEAR) if scale < 1 else gray), scale

    def faces(self, image, small=None, scale=1.0):
        """image (H, W, 3) uint8 RGB -> [Face], largest first. Falls back to full resolution when
        the small copy shows no face (a small face in a large frame)."""
        if small is None:
            small, scale = self.small(image)
        rects = self.detector(small, 0)  # Sec. III-C: "a light-weighted face detector"
        if not rects and scale < 1:
            rects, scale = self.detector(image, 0), 1.0
        faces = []
        for r in rects:
            box = (r.left() / scale, r.top() / scale, r.right() / scale, r.bottom() / scale)
            # the keypoints
            shape = self.predictor(image, dlib.rectangle(*map(round, box)))  # Sec. III-C
            faces.append(Face(box, np.array([(p.x, p.y) for p in shape.parts()], dtype=np.float32)))
        return sorted(faces, key=lambda f: -(f.box[2] - f.box[0]) * (f.box[3] - f.box[1]))


@functools.cache
def face_finder():
    """One FaceFinder per process (loading the models takes ~0.65 s; pool workers reuse theirs)."""
    return FaceFinder()


def hull_mask(points, size):
    """M of Sec. III-C: 1 inside the convex hull of the points (N, 2) (x, y in pixels, as dlib
    reports them), 0 outside -> (size, size) uint8. A pixel is inside when its centre meets every
    facet's a*x + b*y + c <= 0 (PIL's polygon fill would paint every pixel the outline touches
    too)."""
    # the convex hull of the keypoints, (K, 3) facets
    facets = ConvexHull(points).equations  # Sec. III-C
    x0, y0 = np.clip(np.floor(points.min(0)).astype(int), 0, size)
    x1, y1 = np.clip(np.ceil(points.max(0)).astype(int) + 1, 0, size)
    ys, xs = np.mgrid[y0:y1, x0:x1]
    inside = (xs[..., None] * facets[:, 0] + ys[..., None] * facets[:, 1]
              + facets[:, 2] <= 1e-6).all(-1)
    mask = np.zeros((size, size), np.uint8)
    mask[y0:y1, x0:x1] = inside
    return mask


def crop_face(image, face, size=CROP_SIZE, scale=1.3):
    """FaceForensics++'s crop: a square of `scale` x the detection's larger side around its centre,
    black where it leaves the frame, resized -> (crop (size, size, 3) uint8, landmarks in crop
    pixels)."""
    x0, y0, x1, y1 = face.box
    side = scale * max(x1 - x0, y1 - y0)
    left, top = (x0 + x1 - side) / 2, (y0 + y1 - side) / 2
    box = tuple(map(round, (left, top, left + side, top + side)))  # round(float) is an int
    # 256x256
    crop = Image.fromarray(image).crop(box).resize((size, size), Image.BILINEAR)  # Sec. IV-B
    k = size / (box[2] - box[0])
    return np.asarray(crop), (face.landmarks - np.array(box[:2], dtype=np.float32)) * k


def read_faces(path, k, size=CROP_SIZE):
    """One input prepared (Sec. IV-B): k evenly spaced frames (iter_frames), the largest face, its
    1.3x square crop. Yields (frame index, crop (size, size, 3) uint8, landmarks in crop pixels (68,
    2), box in frame pixels), or (frame index, None, None, None) without a face; raises what the
    decoder raises."""
    finder = face_finder()
    for i, rgb, small, scale in iter_frames(path, k):
        faces = finder.faces(rgb, small, scale)
        yield (i, *crop_face(rgb, faces[0], size), faces[0].box) if faces else (i, None, None, None)


# ==============================================================================================
# Below: not the paper's method.

# ----------------------------------------------------------------------------------------------
# 2) Reading K evenly spaced frames, one at a time: a video, a folder of frames, or a photo

def even_indices(n, k):
    """k evenly spaced frame indices out of n (the centres of k equal parts; all n if n <= k)."""
    return list(range(n)) if n <= k else [int((i + 0.5) * n / k) for i in range(k)]


def load_rgb(path):
    """An image file -> (H, W, 3) uint8 RGB, upright (EXIF), 16-bit and float images scaled to 8
    bits (PIL's convert("RGB") clips a 16-bit PNG to white)."""
    with Image.open(path) as image:
        image = ImageOps.exif_transpose(image)
        if image.mode.startswith("I") or image.mode == "F":
            a = np.asarray(image, dtype=np.float64)
            if image.mode.startswith("I;16") or a.max() > 255:
                a = a / 257
            elif a.max() <= 1:
                a = a * 255
            image = Image.fromarray(np.clip(np.round(a), 0, 255).astype(np.uint8))
        return np.asarray(image.convert("RGB"))


def iter_frames(path, k):
    """(frame index, RGB (H, W, 3) uint8, a gray copy of at most DETECT_SIZE px, its scale) for k
    evenly spaced frames of a video or a folder of frames (natural order), or a photo's one: one at
    a time."""
    if os.path.isdir(path):
        # 2.png before 10.png
        names = sorted((f for f in os.listdir(path) if f.lower().endswith(IMAGE_EXTENSIONS)),
                       key=lambda name: [int(t) if t.isdigit() else t.lower()
                                         for t in re.split(r"(\d+)", name)])
        files = [os.path.join(path, name) for name in names]
    elif path.lower().endswith(IMAGE_EXTENSIONS):
        files = [path]  # frame 0 (k >= 1)
    else:
        yield from _video_frames(path, k)
        return
    for i in even_indices(len(files), k):
        rgb = load_rgb(files[i])
        yield (i, rgb, *FaceFinder.small(rgb))


def _video_frames(path, k, seek_gap=250):
    """Decodes front to back, converting only the wanted frames; seeks to the keyframe before a
    wanted frame more than seek_gap frames ahead (a long video). Frames turned upright (phone
    footage)."""
    with av.open(path) as container:
        if not container.streams.video:
            raise ValueError("no video stream")
        stream = container.streams.video[0]
        fps, start = float(stream.average_rate or 25), stream.start_time or 0
        frames, position = container.decode(stream), -1  # position: index of the last decoded frame
        for target in even_indices(stream.frames or _count_frames(path), k):
            if target - position > seek_gap:
                # to the keyframe before
                container.seek(start + int(target / fps / stream.time_base), stream=stream)
                frames, position = container.decode(stream), None
            for frame in frames:
                if position is None:  # after a seek: the frame's own index, from its time
                    position = round((frame.pts - start) * stream.time_base * fps)
                else:
                    position += 1
                if position >= target:
                    break
            else:
                return  # the video ended early (fewer frames than its header says)
            scale = min(1.0, DETECT_SIZE / max(frame.width, frame.height))
            turns = round(frame.rotation / 90) % 4
            small = frame.reformat(width=round(frame.width * scale),
                                   height=round(frame.height * scale), format="gray")
            yield (position,
                   np.ascontiguousarray(np.rot90(frame.to_ndarray(format="rgb24"), turns)),
                   np.ascontiguousarray(np.rot90(small.to_ndarray(), turns)), scale)


def _count_frames(path):
    """Frames of a container that does not state its length (counted from the packets, no
    decoding)."""
    with av.open(path) as container:
        return sum(1 for packet in container.demux(video=0) if packet.size)


# ----------------------------------------------------------------------------------------------
# 3) The datasets as their owners lay them out -> a list of videos to prepare

class Video(NamedTuple):
    split: str
    label: int  # 0 real, 1 fake
    method: str  # "original" or a manipulation for FF++; the folder for Celeb-DF
    name: str  # the video's file name without extension
    path: str


def _need(path, what):
    if not os.path.exists(path):
        raise InputError(f"{path}: not found; expected {what}")
    return path


def _video_path(folder, name):
    """FF++ and Celeb-DF ship mp4s; a folder of extracted frames with the same name works too."""
    mp4 = os.path.join(folder, name + ".mp4")
    return mp4 if os.path.exists(mp4) or not os.path.isdir(mp4[:-4]) else mp4[:-4]


def ffpp_videos(src, compression, methods, splits_dir):
    """FaceForensics++ as its download script lays it out, with the official split files (JSON lists
    of ["A", "B"] pairs: the split holds real videos A and B and the fakes A_B and B_A)."""
    _need(src,
          "the FaceForensics++ download root (holding original_sequences/, manipulated_sequences/)")
    # c40
    real_dir = _need(f"{src}/original_sequences/youtube/{compression}/videos",  # Table VI
                     f"the real videos (download with -c {compression})")
    fake_dirs = {m: _need(f"{src}/manipulated_sequences/{m}/{compression}/videos",
                          f"the {m} videos (download with -d {m} -c {compression})")
                          for m in methods}
    videos = []
    for split in SPLITS:
        pairs = _read_pairs(_need(f"{splits_dir}/{split}.json",
                                  "FaceForensics++'s official split file (dataset/splits/ of its "
                                  "repository)"))
        for name in sorted({a for pair in pairs for a in pair}):
            videos.append(Video(split, 0, "original", name, _video_path(real_dir, name)))
        for m in methods:
            for a, b in pairs:
                videos += [Video(split, 1, m, n, _video_path(fake_dirs[m], n))
                           for n in (f"{a}_{b}", f"{b}_{a}")]
    return videos


def _read_pairs(path):
    with open(path) as f, contextlib.suppress(json.JSONDecodeError, UnicodeDecodeError):
        pairs = json.load(f)
        if isinstance(pairs, list) and all(isinstance(p, list) and len(p) == 2
                                           and all(isinstance(v, str) for v in p) for p in pairs):
            return pairs
    raise InputError(f"{path}: expected a JSON list of [\"A\", \"B\"] pairs of video ids, like "
                     f"[[\"071\", \"054\"], ...]")


def celebdf_videos(src, val_fraction=0.1):
    """Celeb-DF (v1 or v2): test = List_of_testing_videos.txt, train = the rest (the paper's
    protocol); validation = about val_fraction of the rest of each class, by identity
    (_validation_people): train and validation share nobody; a swap between the two sides is left
    out of both."""
    _need(src, "the Celeb-DF root (holding Celeb-real/, YouTube-real/, Celeb-synthesis/)")
    test = _read_test_list(_need(f"{src}/List_of_testing_videos.txt",
                                 "Celeb-DF's list of test videos"))
    all_videos = [(folder, os.path.splitext(file)[0]) for folder in (*CELEBDF_REAL, CELEBDF_FAKE)
                  for file in sorted(os.listdir(_need(f"{src}/{folder}",
                                                      f"Celeb-DF's {folder}/ folder")))
                  if file.endswith(".mp4") or os.path.isdir(f"{src}/{folder}/{file}")]
    ids = {v: _identities(*v) for v in all_videos}
    held_out = _validation_people([v for v in all_videos if f"{v[0]}/{v[1]}.mp4" not in test], ids,
                                  val_fraction)
    videos = []
    for folder, name in all_videos:
        split = ("test" if f"{folder}/{name}.mp4" in test else "val"
                 if ids[folder, name] <= held_out
                 else "train" if not ids[folder, name] & held_out else None)
        if split:
            videos.append(Video(split, int(folder == CELEBDF_FAKE), folder, name,
                                _video_path(f"{src}/{folder}", name)))
    return videos


def _read_test_list(path):
    test = set()
    with open(path) as f:
        for n, line in enumerate(f, 1):
            fields = line.split()
            if fields and (len(fields) != 2 or fields[0] not in ("0", "1") or "/" not in fields[1]):
                raise InputError(f"{path}, line {n}: expected '<1 real | 0 fake> "
                                 f"<folder>/<file>.mp4', got {line.strip()[:80]!r}")
            test.update(fields[1:])
    return test


def _validation_people(videos, ids, fraction):
    """The identities held out: a group grown by the identity that completes the most swaps inside
    it (ties: fewest swaps cut, then name) until its swaps are `fraction` of the fakes; then
    identities without swaps (YouTube-real videos) until the reals reach their fraction too."""
    fakes = [ids[v] for v in videos if v[0] == CELEBDF_FAKE]
    reals = [ids[v] for v in videos if v[0] != CELEBDF_FAKE]
    inside = lambda group, members: sum(m <= group for m in members)
    cut = lambda group: sum(bool(m & group) and not m <= group for m in fakes)
    swapped, held = sorted(set().union(*fakes)), set()
    while inside(held, fakes) < fraction * len(fakes) and len(held) < len(swapped):
        held.add(max((p for p in swapped if p not in held),
                     key=lambda p: (inside(held | {p}, fakes), -cut(held | {p}))))
    for person in sorted(set().union(*reals) - set(swapped)):
        if inside(held, reals) >= fraction * len(reals):
            break
        held.add(person)
    return held


def _identities(folder, name):
    """id0_0001 -> {id0}; id0_id16_0001 -> {id0, id16}; a YouTube-real video is its own identity."""
    found = set(re.findall(r"id\d+", name))
    return found if found and folder != "YouTube-real" else {f"{folder}/{name}"}


# ----------------------------------------------------------------------------------------------
# 4) Preparation: per video, K frames -> largest face -> 1.3x square crop, hull mask, record; the
# manifest

def parse_methods(data, text):
    if not text:
        return list(METHODS[data])
    methods = [m.strip() for m in text.split(",") if m.strip()]
    for m in methods:
        if m not in METHODS[data]:
            raise InputError(f"--methods: unknown {data} method {m!r}; expected some of "
                             f"{','.join(METHODS[data])}")
    return methods


def _files(video, frame):
    stem = f"{video.method}/{video.name}/{frame:04d}.png"
    return f"faces/{stem}", f"masks/{stem}"


def _record_path(root, video):
    return f"{root}/records/{video.method}/{video.name}.json"


def prepare_video(video, root, settings):
    """One video -> crops and masks under root, then its record, written last: a video with a record
    is finished, one without is prepared again. Whatever fails in the video's own work (its folder,
    its frames, its PNGs) is recorded as its reason and stops nothing else: a video that cannot be
    read (missing, a partial download) or whose files cannot be written is tried again by the next
    run (retry), one that fails otherwise, or shows no face, is not. A full disk (ENOSPC), a
    record that cannot be written and an InputError are raised: they end the run (prepare)."""
    record = _record(video, settings)
    seen, size = 0, settings["size"]
    reading = False  # whether a failure came from reading the video, not from writing its files
    try:
        # the attempt began (_started)
        os.makedirs(f"{root}/faces/{video.method}/{video.name}", exist_ok=True)
        reading = True
        for i, crop, points, _ in read_faces(video.path, settings["frames"], size):
            reading = False
            seen += 1
            if crop is None:
                record["skipped_frames"].append([i, "no face"])
            else:
                image_file, mask_file = (os.path.join(root, f) for f in _files(video, i))
                mask = hull_mask(points, size) * 255
                atomic_write(image_file,
                             lambda f: Image.fromarray(crop).save(f, "PNG", compress_level=1))
                atomic_write(mask_file, lambda f: Image.fromarray(mask).save(f, "PNG"))
                record["frames"].append(i)
            reading = True
    except InputError:  # not the video's fault (no landmark model): the run ends (prepare)
        raise
    except Exception as e:  # one video's failure, whatever else it is, is its recorded reason
        if getattr(e, "errno", None) == errno.ENOSPC:  # the disk's fault: the run ends (prepare)
            raise OSError(errno.ENOSPC, "No space left on device", f"{video.method}/{video.name}")
        record["retry"] = isinstance(e, READ_ERRORS)
        what = "failed"
        if record["retry"]:
            what = "unreadable video" if reading else "its files could not be written"
        record["reason"] = f"{what} ({reason(e)})"
    if not record["reason"] and not record["frames"]:
        record["reason"] = f"no face in any of its {seen} frames" if seen else "no frames decoded"
    write_text(_record_path(root, video), json.dumps(record))
    return record


def _started(root, video):
    """An attempt at the video began (its folder of faces exists) and did not end (no record)."""
    began = os.path.isdir(f"{root}/faces/{video.method}/{video.name}")
    return began and not os.path.exists(_record_path(root, video))


def _record(video, settings, reason=""):
    return dict(video._asdict(), settings=settings, frames=[], skipped_frames=[], reason=reason,
                retry=False)


def _dead_worker(video, root, settings):
    record = _record(video, settings, "failed (the process preparing it died: killed by a signal, "
                     "out of memory, or a crash in native code)")
    write_text(_record_path(root, video), json.dumps(record))
    return record


def _run_jobs(jobs, workers):
    """Each job's record, `workers` videos at a time. A worker that dies (a signal, out of memory, a
    crash in native code) breaks its pool: the videos then in flight are tried again each in a pool
    of its own, so that the one that kills its worker again is recorded as failed; the rest go on.
    Anything else prepare_video raises ends the run (its pool's queued videos cancelled).
    workers=1: in this process (a crash in native code ends the run there)."""
    if workers == 1:
        yield from (prepare_video(*job) for job in jobs)
        return
    while jobs:
        broken = []
        with ProcessPoolExecutor(workers, multiprocessing.get_context("spawn")) as pool:
            futures = {pool.submit(prepare_video, *job): job for job in jobs}
            try:
                for future in as_completed(futures):
                    if isinstance(future.exception(), BrokenProcessPool):
                        broken.append(futures[future])  # sorted out below
                    else:
                        yield future.result()  # its record, or what it raised
            except BaseException:
                pool.shutdown(cancel_futures=True)
                raise
        started = [job for job in broken if _started(job[1], job[0])]
        if len(broken) == len(jobs) and not started:  # no video began: it would never end
            raise InputError(
                "the worker processes ended before preparing any video; try --workers 1 to see why")
        for job in started:
            with ProcessPoolExecutor(1, multiprocessing.get_context("spawn")) as pool:
                try:
                    yield pool.submit(prepare_video, *job).result()
                except BrokenProcessPool:
                    yield _dead_worker(*job)
        jobs = [job for job in broken if not os.path.exists(_record_path(job[1], job[0]))]


def prepare(videos, root, settings, workers, redo=False):
    """Prepares every video without a record (or recorded with retry; with redo, all), in parallel,
    then the manifest and the report from all records under root. Preparing into a root made with
    other settings (every record carries them) is an error; a full disk ends the run in one line,
    the videos finished kept."""
    records = _records(root)
    other = next((r["settings"] for r in records.values() if r["settings"] != settings), settings)
    if other != settings and not redo:
        # --frames and --compression are options, the others constants
        changed = [f"{'--' if k in ('frames', 'compression') else ''}{k} {other.get(k)} (now {v})"
                   for k, v in settings.items() if other.get(k) != v]
        raise InputError(f"{root}: prepared with {', '.join(changed)}; prepare into another "
                         "--root, or add --redo to prepare every video again")
    old = [records.get(_record_path(root, v)) for v in videos]  # None: no record
    jobs = [(v, root, settings) for v, r in zip(videos, old) if not r or redo or r.get("retry")]
    for video, _, _ in jobs:  # an earlier attempt's record and frames go
        for kind in ("faces", "masks"):
            shutil.rmtree(f"{root}/{kind}/{video.method}/{video.name}", ignore_errors=True)
        with contextlib.suppress(FileNotFoundError):
            os.remove(_record_path(root, video))
    print(f"{len(videos)} videos, {len(videos) - len(jobs)} already prepared, {len(jobs)} to do "
          f"({len(jobs) - old.count(None)} of them again), {workers} workers")
    start, done = time.time(), 0
    try:
        for record in _run_jobs(jobs, workers):
            done += len(record["frames"])
            if record["reason"]:
                print(f"  skipped {record['method']}/{record['name']}: {record['reason']}"
                      + ("  (tried again on the next run)" if record["retry"] else ""))
    except OSError as e:
        if e.errno != errno.ENOSPC:
            raise
        raise InputError(f"{root}: no space left on its disk (preparing {e.filename}); the videos "
                         "finished are kept: free space and run again") from e
    elapsed = time.time() - start
    print(f"prepared {done} frames in {elapsed:.1f} s ({done / max(elapsed, 1e-9):.1f} frames/s)")
    return write_manifest(root)


RECORD_KEYS = ("split", "label", "method", "name", "path", "settings", "frames", "skipped_frames",
               "reason")


def _records(root, quiet=False):
    """Every video's record under root, by path; one that cannot be read is reported and left out
    (its video is prepared again)."""
    found = {}
    for path in sorted(glob.glob(f"{root}/records/*/*.json")):
        try:
            with open(path) as f:
                record = json.load(f)
            if not isinstance(record, dict) or any(k not in record for k in RECORD_KEYS):
                raise ValueError(f"expected a JSON object with {', '.join(RECORD_KEYS)}")
            found[path] = record
        except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
            if not quiet:
                print(f"  {path}: not a readable record ({reason(e)}); its video is prepared again")
    return found


def write_manifest(root):
    """manifest.csv (a row a frame: split, label, method, video, frame, image, mask) and report.txt
    (every skipped video and frame, with the reason) from the records; prints the counts per split
    and class."""
    rows, skipped, videos, frames = [], [], collections.Counter(), collections.Counter()
    for r in _records(root, quiet=True).values():
        video = Video(*(r[k] for k in Video._fields))
        rows += [[video.split, video.label, video.method, video.name, i, *_files(video, i)]
                 for i in r["frames"]]
        skipped += [f"{r['method']}/{r['name']}\tvideo\t{r['reason']}"] * bool(r["reason"])
        skipped += [f"{r['method']}/{r['name']}\tframe {i}\t{why}"
                    for i, why in r["skipped_frames"]]
        videos[video.split, video.label] += bool(r["frames"])
        frames[video.split, video.label] += len(r["frames"])
    text = io.StringIO()
    csv.writer(text, lineterminator="\n").writerows([["split", "label", "method", "video", "frame",
                                                      "image", "mask"]] + rows)
    write_text(f"{root}/manifest.csv", text.getvalue())
    header = (f"# {len(rows)} frames prepared; {len(skipped)} videos or frames skipped (name, "
              "what, reason)\n")
    write_text(f"{root}/report.txt", header + "\n".join(skipped) + "\n")
    print(f"wrote {root}/manifest.csv ({len(rows)} frames) and {root}/report.txt ({len(skipped)} "
          f"skipped)")
    for split, label in sorted(videos, key=lambda key: (SPLITS.index(key[0]), key[1])):
        print(f"  {split:5s} {'fake' if label else 'real'}: {videos[split, label]} videos, "
              f"{frames[split, label]} frames")
    return rows, skipped


# ----------------------------------------------------------------------------------------------
# 5) Built-in synthetic faces: drawn, lit and photographed procedurally, then manipulated

# The benchmark's presets (--synthetic), each artifact's strength (manipulate). "easy", the demo:
# every
# network reaches test AUC 0.99+ in 12 epochs. "hard" (Table VI's low-quality idea), to compare
# networks: subtler blending, the fakes re-noised, every frame JPEG-compressed at quality 40.
SYNTHETIC_PRESETS = {"easy": dict(blur=0.5, mismatch=0.3, gan_scale=4, fake_noise=0.0, jpeg=None),
                     "hard": dict(blur=0.3, mismatch=0.15, gan_scale=2, fake_noise=1.0, jpeg=40)}


def random_identity(rng):
    """Face shape in face units (the face is ~1 wide, y down, 0 at the face centre) and colours."""
    u = rng.uniform
    skin = np.array([u(0.35, 0.95), 0, 0])
    skin[1:] = skin[0] * np.array([u(0.68, 0.82), u(0.52, 0.70)])
    return dict(jaw_w=u(0.40, 0.50), jaw_h=u(0.52, 0.66), eye_y=u(-0.20, -0.12),
                eye_dx=u(0.17, 0.23),
                eye_w=u(0.065, 0.09), eye_h=u(0.022, 0.036), brow_gap=u(0.07, 0.11),
                brow_arch=u(0.01, 0.04),
                nose_len=u(0.17, 0.25), nose_w=u(0.07, 0.11), mouth_y=u(0.24, 0.32),
                mouth_w=u(0.12, 0.18),
                lip_up=u(0.018, 0.035), lip_low=u(0.025, 0.045), skin=skin,
                lips=skin * np.array([u(0.75, 0.95), u(0.45, 0.6), u(0.5, 0.65)]),
                iris=u(0.05, 0.6, 3),
                hair=u(0.02, 0.5) * np.array([1, u(0.6, 0.9), u(0.3, 0.7)]))


def face_points(idt, ex):
    """The 68 landmarks in dlib's index layout, in face units: jaw 0-16 (image left to right), brows
    17-26, nose bridge 27-30, nostrils 31-35, eyes 36-47 (corner, two upper, corner, two lower),
    mouth 48-59 outside and 60-67 inside, both clockwise from the left corner."""
    t = np.linspace(0, np.pi, 17)
    eye_y = idt["eye_y"]
    jaw = np.stack([-idt["jaw_w"] * np.cos(t), eye_y + 0.04 + idt["jaw_h"] * np.sin(t)], 1)
    u = np.linspace(0, 1, 5)
    brow_x = -idt["eye_dx"] - 1.4 * idt["eye_w"] + 2.3 * idt["eye_w"] * u
    brow_y = (eye_y - idt["brow_gap"] - ex["brow_raise"]
              - idt["brow_arch"] * np.sin(np.pi * u))
    nose_y = eye_y + idt["nose_len"]
    v = np.linspace(-1, 1, 5)
    a = np.array([np.pi, 2 * np.pi / 3, np.pi / 3, 0, -np.pi / 3, -2 * np.pi / 3])
    eye = np.stack([idt["eye_w"] * np.cos(a), eye_y - idt["eye_h"] * np.sin(a)], 1)
    return np.concatenate([
        jaw, np.stack([brow_x, brow_y], 1), np.stack([-brow_x[::-1], brow_y[::-1]], 1),
        np.stack([np.zeros(4), np.linspace(eye_y + 0.02, nose_y, 4)], 1),
        np.stack([v * idt["nose_w"], nose_y + 0.03 + 0.015 * (1 - v ** 2)], 1),
        eye - [idt["eye_dx"], 0], eye + [idt["eye_dx"], 0],
        _lips(idt, ex, np.pi - np.arange(12) * np.pi / 6, 1.0, (idt["lip_up"], idt["lip_low"])),
        _lips(idt, ex, np.pi - np.arange(8) * np.pi / 4, 0.75, (0.0, 0.0))]).astype(np.float32)


def _lips(idt, ex, angles, width, thickness):
    s, c = np.sin(angles), np.cos(angles)
    reach = ex["mouth_open"] / 2 + np.where(s > 0, thickness[0], thickness[1])
    y = idt["mouth_y"] - reach * s - ex["smile"] * c ** 2  # corners rise with a smile
    return np.stack([width * idt["mouth_w"] * c, y], 1)


def project(points, pose, turn):
    """Face units -> pixels: yaw moves the inner face sideways (turn=1) and shortens the far jaw."""
    p = points.copy()
    p[:, 0] = (p[:, 0] * (1 - pose["yaw"] * np.sign(p[:, 0]) * 0.25 * (1 - turn))
               + pose["yaw"] * 0.15 * turn)
    c, s = math.cos(pose["roll"]), math.sin(pose["roll"])
    return np.stack([c * p[:, 0] - s * p[:, 1], s * p[:, 0] + c * p[:, 1]],
                    1) * pose["scale"] + [pose["x"], pose["y"]]


def random_scene(rng, size):
    """Per video: a background (two-colour gradient and blurred blobs), lighting and the camera."""
    ss = 2 * size
    u = rng.uniform
    top, bottom = u(0, 1, 3), u(0, 1, 3)
    ramp = np.linspace(0, 1, ss)[:, None, None]
    gradient = 255 * (top + (bottom - top) * ramp) * np.ones((1, ss, 1))
    background = Image.fromarray(np.uint8(gradient))
    draw = ImageDraw.Draw(background)
    for _ in range(4):
        x, y, r = u(0, ss, 2).tolist() + [u(0.05, 0.3) * ss]
        draw.ellipse((x - r, y - r, x + r, y + r),
                     fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    return dict(background=background.filter(ImageFilter.GaussianBlur(ss / 40)),
                light=u(-0.5, 0.5), light_angle=u(0, 2 * np.pi), blur=u(0.3, 0.6) * size / 64,
                noise=u(3, 7) / 255)


def render_face(idt, ex, pose, scene, size, noise_rng=None, blur=0.0):
    """Draw one face at 2x size (PIL), downsample (anti-aliasing), light it, blur it by the optics
    (+ `blur` px) and, with noise_rng, add sensor noise. -> ((size, size, 3) float32, landmarks (68,
    2))."""
    pose2 = dict(pose, x=2 * pose["x"], y=2 * pose["y"], scale=2 * pose["scale"])
    pts = project(face_points(idt, ex), pose2, np.r_[np.zeros(17), np.ones(51)])
    image = scene["background"].copy()
    draw = ImageDraw.Draw(image)
    _draw_face(draw, idt, pose2, pts, size)
    small = image.resize((size, size), Image.BOX)
    lit = np.asarray(small.filter(ImageFilter.GaussianBlur(scene["blur"] + blur)),
                     dtype=np.float32) / 255
    yy, xx = np.mgrid[0:size, 0:size] / size
    ca, sa = math.cos(scene["light_angle"]), math.sin(scene["light_angle"])
    lit = lit * (1 + scene["light"] * ((xx - 0.5) * ca + (yy - 0.5) * sa))[..., None]
    if noise_rng is not None:
        lit = lit + noise_rng.normal(0, scene["noise"], lit.shape)
    return np.clip(lit, 0, 1).astype(np.float32), pts / 2


def _rgb(colour, k=1.0):
    return tuple(int(255 * min(1.0, max(0.0, v * k))) for v in colour)


def _draw_face(draw, idt, pose2, pts, size):
    """Hair, neck, the skin of the face (the jaw line closed by the forehead), brows, nose,
    eyes, lips."""
    a = np.linspace(np.pi, 2 * np.pi, 15)
    jaw_w = idt["jaw_w"]
    skin = idt["skin"]
    top = idt["eye_y"] + 0.04
    forehead = np.stack([jaw_w * np.cos(a), top + 0.55 * np.sin(a)], 1)
    hair = np.stack([1.18 * jaw_w * np.cos(2 * a), top - 0.12
                     + 0.62 * np.sin(2 * a) * (np.sin(2 * a) < 0)
                     + 0.25 * np.sin(2 * a) * (np.sin(2 * a) >= 0)], 1)
    neck = np.array([[-0.6 * jaw_w, 0.2], [0.6 * jaw_w, 0.2], [0.7 * jaw_w, 2.0],
                     [-0.7 * jaw_w, 2.0]])
    still = np.zeros(len(a))  # these points do not move with the yaw
    draw.polygon(_xy(project(hair, pose2, still)), fill=_rgb(idt["hair"]))
    draw.polygon(_xy(project(neck, pose2, np.zeros(4))), fill=_rgb(skin, 0.8))
    face = np.concatenate([pts[:17], project(forehead, pose2, still)[::-1][1:-1]])
    draw.polygon(_xy(face), fill=_rgb(skin))
    line = max(1, int(2 * size * 0.012))  # drawn at 2x
    for brow in (pts[17:22], pts[22:27]):
        draw.line(_xy(brow), fill=_rgb(idt["hair"], 0.8), width=2 * line)
    draw.line(_xy(pts[27:31]), fill=_rgb(skin, 0.78), width=line)
    draw.line(_xy(pts[31:36]), fill=_rgb(skin, 0.6), width=line)
    for eye in (pts[36:42], pts[42:48]):
        draw.polygon(_xy(eye), fill=(235, 235, 230))
        (cx, cy), r = eye.mean(0), 0.32 * (eye[3, 0] - eye[0, 0])
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=_rgb(idt["iris"]))
        draw.ellipse((cx - r / 2, cy - r / 2, cx + r / 2, cy + r / 2), fill=(15, 10, 10))
    draw.polygon(_xy(pts[48:60]), fill=_rgb(idt["lips"]))
    draw.polygon(_xy(pts[60:68]), fill=(60, 20, 25))


def _xy(points):
    """(N, 2) points -> the [(x, y), ...] PIL draws."""
    return [tuple(p) for p in points.tolist()]


INNER_FACE = ("eye_y", "eye_dx", "eye_w", "eye_h", "brow_gap", "brow_arch", "nose_len", "nose_w",
              "mouth_y",
              "mouth_w", "lip_up", "lip_low", "skin", "lips", "iris")


def manipulate(family, real, pts, idt, ex, pose, scene, size, rng, p):
    """A fake made from a real frame, as the FF++ families are made from real videos: swap
    (FaceSwap-like: another person's inner face, its skin colour partly matched), mouth
    (NeuralTextures-like: the mouth re-rendered), gan (the face through a down/up-sampling,
    recoloured), blended into the face hull. The preset sets the extra blur (blur), the donor's
    colour left (mismatch), the GAN's factor (gan_scale) and the camera noise the new content gets
    (fake_noise). -> fake (size, size, 3), its landmarks (68, 2), the blending weight (size, size)
    in [0, 1]."""
    if family == "swap":
        donor = random_identity(rng)
        mixed = dict(idt, **{k: donor[k] for k in INNER_FACE})
        k = p["mismatch"]  # the colour only partly corrected
        mixed["skin"], mixed["lips"] = (1 - k) * idt["skin"] + k * donor["skin"], donor["lips"]
        content, fake_pts = render_face(mixed, ex, pose, scene, size, blur=p["blur"])
        region = (fake_pts - fake_pts[30]) * 0.92 + fake_pts[30]
    elif family == "mouth":
        ex2 = dict(ex, mouth_open=ex["mouth_open"] + rng.uniform(0.02, 0.05),
                   smile=rng.uniform(-0.01, 0.04))
        content, fake_pts = render_face(idt, ex2, pose, scene, size, blur=p["blur"])
        both = np.concatenate([pts[48:68], fake_pts[48:68]])
        region = (both - both.mean(0)) * 1.6 + both.mean(0)
    else:  # gan (synthetic_frame has checked the family: SYNTHETIC_METHODS.index)
        small = Image.fromarray(np.uint8(real * 255)).resize((round(size / p["gan_scale"]),) * 2,
                                                             Image.BOX)
        content = np.asarray(small.resize((size, size), Image.BILINEAR), dtype=np.float32) / 255
        content, fake_pts = np.clip(content * rng.uniform(0.92, 1.08, 3), 0, 1), pts
        region = (pts - pts[30]) * 0.95 + pts[30]
    if p["fake_noise"]:
        content = content + rng.normal(0, p["fake_noise"] * scene["noise"], content.shape)
    inside = hull_mask(region, size) * hull_mask(fake_pts, size)  # a manipulation stays on the face
    soft = Image.fromarray(inside * 255).filter(ImageFilter.GaussianBlur(size / 64))
    weight = np.asarray(soft, dtype=np.float32)[..., None] / 255
    return real * (1 - weight) + content * weight, fake_pts, weight[..., 0]


def synthetic_frame(seed, video, frame, size, family=None, preset=SYNTHETIC_PRESETS["easy"]):
    """One frame of synthetic video `video` and, with `family`, its fake -> dict(real, real_points,
    fake, fake_points, weight); images (size, size, 3) float32 in [0, 1]."""
    rng = np.random.default_rng([seed, video])  # the video: person, background, light, camera
    idt, scene = random_identity(rng), random_scene(rng, size)
    rng = np.random.default_rng([seed, video, frame])  # the frame: pose, expression, noise
    u = rng.uniform
    pose = dict(x=size * u(0.46, 0.54), y=size * u(0.46, 0.54), scale=size * u(0.52, 0.62),
                roll=u(-0.2, 0.2), yaw=u(-0.35, 0.35))
    ex = dict(mouth_open=u(0, 0.02) if rng.random() < 0.6 else u(0.02, 0.07),
              smile=u(-0.01, 0.03), brow_raise=u(0, 0.02))
    real, pts = render_face(idt, ex, pose, scene, size, noise_rng=rng)
    out = dict(real=real, real_points=pts)
    if family:
        fake_rng = np.random.default_rng([seed, video, frame, 1 + SYNTHETIC_METHODS.index(family)])
        out["fake"], out["fake_points"], out["weight"] = manipulate(
            family, real, pts, idt, ex, pose, scene, size, fake_rng, preset)
    return out


def jpeg(image, quality):
    """(H, W, 3) uint8 -> the same image after a JPEG round trip at this quality (4:2:0, as
    video codecs)."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
    return np.asarray(Image.open(buffer).convert("RGB"))


# ----------------------------------------------------------------------------------------------
# 6) What the five scripts share: one-line errors, the argument parser, atomic writes, the CPUs

def reason(e):
    """An exception in one line: "ValueError: its first line" (at most 120 characters of it)."""
    return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:120]}"


class InputError(Exception):
    """A user mistake (a bad file, flag or dataset): the scripts print it as one line, no
    traceback."""


class Parser(argparse.ArgumentParser):
    """argparse whose mistakes are InputErrors: a bad flag is one line, like every user mistake."""
    def error(self, message):
        raise InputError(message)


def bounded(kind, low, high=math.inf):
    """An argparse type: a finite `kind` (int or float) with low <= value (< high when given)."""
    expected = f"{'a whole number' if kind is int else 'a number'} >= {low}"
    if high < math.inf:
        expected += f" and < {high}"

    def parse(text):
        with contextlib.suppress(ValueError):
            value = kind(text)
            if math.isfinite(value) and low <= value < high:
                return value
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
    return parse


def atomic_write(path, write):
    """write(f) into a temporary file, flushed to disk, then renamed: a kill or a crash never leaves
    a half-written file, the previous one stays until the new one is complete."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_text(path, text):
    """atomic_write of a str (UTF-8)."""
    atomic_write(path, lambda f: f.write(text.encode()))


def usable_cpus():
    """The CPUs this process may use: its affinity mask, capped by a cgroup v2 quota
    (os.cpu_count() sees neither)."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        with open("/sys/fs/cgroup/cpu.max") as f:
            quota, period = f.read().split()
        return n if quota == "max" else max(1, min(n, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        return n


# ----------------------------------------------------------------------------------------------
# 7) Command line

def main(argv=None):
    p = Parser(description=__doc__.split("\n\n")[0],
               formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", choices=("ff++", "celeb-df"), required=True,
                   help="the dataset to prepare")
    p.add_argument("--src", required=True, help="the dataset as downloaded")
    p.add_argument("--root", help="where to write the prepared data (default: data/<name>)")
    p.add_argument("--compression", default="c23", choices=("raw", "c23", "c40"),
                   help="ff++: quality (paper: c23, HQ; Table VI: c40)")
    p.add_argument("--methods", help="ff++: manipulations, comma-separated (default: all four)")
    p.add_argument("--splits",
                   help="ff++: folder of train.json, val.json, test.json (default: SRC/splits)")
    p.add_argument("--frames", type=bounded(int, 1), default=32,
                   help="evenly spaced frames per video (default 32)")
    p.add_argument("--workers", type=bounded(int, 1), help="parallel videos, each in a process of "
                   "its own (default: the CPUs this process may use; 1: in this process)")
    p.add_argument("--redo", action="store_true",
                   help="prepare every video again (e.g. with other --frames)")
    args = p.parse_args(argv)
    settings = dict(frames=args.frames, size=CROP_SIZE, detect_size=DETECT_SIZE,  # every record's
                    compression=args.compression if args.data == "ff++" else None)
    if args.data == "celeb-df":
        videos = celebdf_videos(args.src)
    else:
        videos = ffpp_videos(args.src, args.compression, parse_methods("ff++", args.methods),
                             args.splits or f"{args.src}/splits")
    root = args.root or f"data/{args.data}"
    prepare(videos, root, settings, args.workers or usable_cpus(), args.redo)


if __name__ == "__main__":
    try:
        main()
    except (InputError, OSError) as e:  # a mistake, or what the disk or the system refused
        sys.exit(f"error: {e}")
