"""Smoke and property tests for ADD on tiny synthetic data, tiny video trees and a real face photo.

    python -m pytest -q            # the whole suite (about a minute on 2 CPU cores)
"""
import json
import math
import os
import shutil
import subprocess
import sys
import wave

import av
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from scipy.ndimage import binary_dilation
from skimage.data import astronaut

import add
import masks
import ops
import search
import train

HERE = os.path.dirname(os.path.abspath(__file__))
# A genotype in the style of the paper's Fig. 8 (separable and dilated convolutions)
GENOTYPE = ops.Genotype(
    normal=(("sep_conv_3x3", 0), ("dil_conv_5x5", 1), ("sep_conv_5x5", 0), ("dil_conv_3x3", 1),
            ("sep_conv_3x3", 1), ("dil_conv_3x3", 2), ("sep_conv_5x5", 0), ("dil_conv_5x5", 3)),
    reduce=(("sep_conv_5x5", 0), ("dil_conv_5x5", 1), ("sep_conv_3x3", 0), ("dil_conv_3x3", 2),
            ("max_pool_3x3", 0), ("sep_conv_5x5", 2), ("dil_conv_5x5", 1), ("skip_connect", 3)))
TINY_SEARCH = ["--videos", "4", "--frames", "1", "--image-size", "32", "--channels", "4", "--cells", "3",
               "--batch-size", "4"]
TINY_TRAIN = ["--videos", "6", "--frames", "1", "--image-size", "32", "--channels", "4", "--batch-size", "8",
              "--log-every", "0", "--visualize", "2"]


def run_cli(*args, cwd=HERE):
    """A script as a user runs it: -> (return code, stdout, stderr)."""
    p = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=cwd, timeout=240)
    return p.returncode, p.stdout, p.stderr


def one_line_error(stderr, *fragments):
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture
def genotype_file(tmp_path):
    path = str(tmp_path / "g.json")
    ops.save_genotype(GENOTYPE, path)
    return path


# ----------------------------------------------------------------------------------------------
# ops.py: the search space, Eq. 1-2, the genotype

@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("name", ops.PRIMITIVES)
def test_every_op_keeps_shape_or_halves_it(name, stride):
    x = torch.randn(2, 6, 8, 8)
    assert ops.OPS[name](6, stride, True)(x).shape == (2, 6, 8 // stride, 8 // stride)
    assert ops.OPS[name](6, stride, False)(torch.randn(2, 6, 7, 9)).shape == (2, 6, 7 // stride + stride - 1, 9 // stride + stride - 1)


def test_search_space_is_the_papers_eleven_operations():
    assert len(ops.PRIMITIVES) == 11 and ops.PRIMITIVES[0] == "none"
    assert {"conv_7x7", "sep_conv_5x5", "dil_conv_5x5", "skip_connect", "avg_pool_3x3"} <= set(ops.PRIMITIVES)


def full_op(mixed, i, C, stride):
    """Operation i as OPS builds it (with its own leading ReLU), holding the mixed op's weights."""
    full = ops.MixedOp._op(ops.PRIMITIVES[i], C, stride).eval()
    stored = mixed.ops[mixed.index.index(i)].state_dict().values()
    full.load_state_dict(dict(zip(full.state_dict().keys(), stored)))
    return full


def test_mixed_op_one_hot_is_that_op_and_zero_is_zero():
    torch.manual_seed(0)
    mixed = ops.MixedOp(4, 2).eval()  # eval: BN uses running statistics, so every call is the same function
    x = torch.randn(2, 4, 8, 8)
    for i, name in enumerate(ops.PRIMITIVES):
        out = mixed(x, F.one_hot(torch.tensor(i), len(ops.PRIMITIVES)).float())
        if name == "none":
            assert out.shape == (2, 4, 4, 4) and (out == 0).all()
            continue
        assert torch.equal(out, full_op(mixed, i, 4, 2)(x))
    assert not any(isinstance(op, ops.Zero) for op in mixed.ops)  # the zero op costs nothing


def test_mixed_op_is_the_softmax_weighted_sum_of_eq2():
    torch.manual_seed(0)
    mixed = ops.MixedOp(4, 1).eval()
    x, alpha = torch.randn(2, 4, 6, 6), torch.randn(len(ops.PRIMITIVES))
    w = torch.exp(alpha) / torch.exp(alpha).sum()
    by_hand = torch.zeros(2, 4, 6, 6)
    for i in mixed.index:
        by_hand += w[i] * full_op(mixed, i, 4, 1)(x)
    assert torch.allclose(mixed(x, alpha.softmax(0)), by_hand, atol=1e-6)


def test_search_and_derived_cells_share_one_wiring():
    search_cell = ops.Cell(ops.search_edges(), 8, 8, 4, reduction=True, reduction_prev=False, affine=False)
    derived = ops.Cell(ops.genotype_edges(GENOTYPE.reduce), 8, 8, 4, reduction=True, reduction_prev=False, affine=True)
    s = torch.randn(2, 8, 8, 8)
    weights = torch.softmax(torch.randn(14, len(ops.PRIMITIVES)), -1)
    assert len(search_cell.ops) == 14 and len(derived.ops) == 8
    assert search_cell(s, s, weights).shape == derived(s, s).shape == (2, 16, 4, 4)


def test_derivation_follows_the_darts_rule_on_a_hand_worked_alpha():
    P = ops.PRIMITIVES.index
    w = torch.full((14, 11), 0.01)
    w[0, P("none")], w[0, P("sep_conv_3x3")] = 0.9, 0.05  # node 0: 'none' never wins; sep_conv_3x3 does
    w[1, P("conv_7x7")] = 0.3
    w[2, P("skip_connect")], w[3, P("max_pool_3x3")], w[4, P("dil_conv_3x3")] = 0.2, 0.6, 0.4  # node 1
    w[5, P("conv_3x3")], w[6, P("none")], w[7, P("dil_conv_5x5")], w[8, P("avg_pool_3x3")] = 0.3, 0.9, 0.5, 0.4
    w[9, P("sep_conv_5x5")], w[13, P("conv_5x5")] = 0.7, 0.2  # node 3: edges from input 0 and node 2
    assert search.derive_cell(w) == (
        ("sep_conv_3x3", 0), ("conv_7x7", 1),
        ("max_pool_3x3", 1), ("dil_conv_3x3", 2),
        ("dil_conv_5x5", 2), ("avg_pool_3x3", 3),
        ("sep_conv_5x5", 0), ("conv_5x5", 4))


def test_derived_genotypes_are_valid_and_round_trip_through_json(tmp_path):
    torch.manual_seed(1)
    model = search.SearchNetwork(4, 3, 2, mask=True)
    with torch.no_grad():
        model.alpha_normal.normal_(0, 1)
        model.alpha_reduce.normal_(0, 1)
    g = model.genotype()
    ops.save_genotype(g, str(tmp_path / "g.json"))
    assert ops.load_genotype(str(tmp_path / "g.json")) == g
    text = (tmp_path / "g.json").read_text()
    assert [line.count('["') for line in text.splitlines() if '["' in line] == [2] * 8  # a node (two pairs) a line
    assert add.ADD(g, 4, add.d2_layout(2, 1), 2)(torch.rand(1, 3, 32, 32))[0].shape == (1, 2)


@pytest.mark.parametrize("content, expected", [
    (None, "no such genotype file"),
    ('{"normal": [["sep_conv_3x3", 0]', "not valid JSON"),
    ('[1, 2]', "expected a JSON object"),
    ('{"normal": [["sep_conv_3x3", 0]], "reduce": []}', '"normal": expected a list of 8 [op, input] pairs'),
    ("NORMAL_ONLY", '"reduce": expected a list of 8 [op, input] pairs (2 per node, 4 nodes), got missing'),
    ("UNKNOWN_OP", "\"normal\"[3]: unknown op 'sep_conv_9x9'"),
    ("BAD_INPUT", '"reduce"[2]: input 3 does not precede node 1'),
    ("BAD_PAIR", '"normal"[0]: expected [op name, input index], got ["sep_conv_3x3", "0"]'),
])
def test_bad_genotype_files_give_one_line_errors(tmp_path, content, expected):
    good = json.loads(ops.genotype_to_json(GENOTYPE))
    if content == "NORMAL_ONLY":
        content = json.dumps({"normal": good["normal"]})
    elif content in ("UNKNOWN_OP", "BAD_INPUT", "BAD_PAIR"):
        cell, k, pair = {"UNKNOWN_OP": ("normal", 3, ["sep_conv_9x9", 1]), "BAD_INPUT": ("reduce", 2, ["conv_3x3", 3]),
                         "BAD_PAIR": ("normal", 0, ["sep_conv_3x3", "0"])}[content]
        good[cell][k] = pair
        content = json.dumps(good)
    path = tmp_path / "bad.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ops.InputError) as e:
        ops.load_genotype(str(path))
    assert str(e.value).startswith(str(path)) and expected in str(e.value) and "\n" not in str(e.value)


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    path = str(tmp_path / "f.txt")
    ops.atomic_write(path, lambda f: f.write(b"old"))

    def crash(f):
        f.write(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        ops.atomic_write(path, crash)
    assert open(path).read() == "old"


# ----------------------------------------------------------------------------------------------
# search.py: Algorithm 1

def tiny_batch(n=8, size=32, videos=4):
    ds = masks.SyntheticFaces("train", list(masks.SYNTHETIC_METHODS), videos, 1, size, seed=0)
    idx = torch.arange(n) % len(ds)
    return ds.images[idx], ds.masks[idx], torch.tensor(ds.labels)[idx], None


def test_search_steps_lower_the_loss_and_move_alpha():
    torch.manual_seed(0)
    model = search.SearchNetwork(4, 3, 2, mask=True)
    w_params, a_params = list(model.net.parameters()), model.arch_parameters()
    w_opt = torch.optim.SGD(w_params, 0.05, momentum=0.9)
    a_opt = torch.optim.Adam(a_params, 0.02)
    alpha0 = [a.detach().clone() for a in a_params]
    batch, cpu = tiny_batch(), torch.device("cpu")
    losses = []
    for _ in range(12):
        losses.append(search.gradient_step(model, w_opt, w_params, batch, cpu, 1.0, 5.0)[2].item())
        search.gradient_step(model, a_opt, a_params, batch, cpu, 1.0, None)
    assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3])
    assert all((a - a0).abs().max() > 1e-3 for a, a0 in zip(a_params, alpha0))


def test_search_writes_genotype_picture_log_and_resumes_after_a_kill(tmp_path, monkeypatch, capsys):
    g, run = str(tmp_path / "g.json"), str(tmp_path / "run")
    argv = TINY_SEARCH + ["--epochs", "2", "--out", g, "--run-dir", run]
    real_log = search.log_epoch

    def killed_in_epoch_2(args, model, genotype, epoch, *rest):
        if epoch == 1:
            raise KeyboardInterrupt  # killed before epoch 2's checkpoint
        real_log(args, model, genotype, epoch, *rest)

    monkeypatch.setattr(search, "log_epoch", killed_in_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        search.main(argv)
    monkeypatch.setattr(search, "log_epoch", real_log)
    saved = torch.load(os.path.join(run, "search.pt"), weights_only=True)
    assert saved["epoch"] == 1 and "alpha_normal" in saved["model"]
    fresh, *optim = search.build(search.parse_args(argv), torch.device("cpu"))
    assert search.restore(saved, run, fresh, *optim) == 1
    assert torch.equal(fresh.alpha_normal, saved["model"]["alpha_normal"])
    model = search.main(argv + ["--resume"])
    assert "resumed" in capsys.readouterr().out
    assert [json.loads(line)["epoch"] for line in open(os.path.join(run, "log.jsonl"))] == [1, 2]
    assert ops.load_genotype(g) == model.genotype()
    assert Image.open(str(tmp_path / "g.png")).size == (1240, 380)


# ----------------------------------------------------------------------------------------------
# masks.py: hull masks, real faces, dataset preparation, synthetic data

def test_hull_mask_area_equals_the_polygon_area():
    n, R, c = 12, 80.0, 100.0
    corners = np.array([(c + R * math.cos(2 * math.pi * k / n), c + R * math.sin(2 * math.pi * k / n)) for k in range(n)])
    inside = c + np.random.default_rng(0).uniform(-40, 40, (56, 2))  # interior points do not change the hull
    mask = masks.hull_mask(np.concatenate([inside, corners]).astype(np.float32), 200)
    area = n / 2 * R ** 2 * math.sin(2 * math.pi / n)  # regular 12-gon
    assert abs(mask.sum() - area) / area < 0.01 and set(np.unique(mask)) == {0, 1}


def test_a_real_photo_gives_one_face_and_a_mask_covering_it():
    image = astronaut()
    faces = masks.FaceFinder().faces(image)
    assert len(faces) == 1
    x0, y0, x1, y1 = faces[0].box
    mask = masks.hull_mask(faces[0].landmarks, *image.shape[:2])
    box = mask[int(y0):int(y1), int(x0):int(x1)]
    assert box.mean() > 0.5 and mask.sum() < 2 * (x1 - x0) * (y1 - y0)  # covers the face, not the photo
    crop, points = masks.crop_face(image, faces[0], size=128)
    assert crop.shape == (128, 128, 3) and 0.25 < masks.hull_mask(points, 128).mean() < 0.75


def test_show_draws_an_overlay_and_rejects_faceless_photos(tmp_path):
    photo, out, blank = str(tmp_path / "a.png"), str(tmp_path / "o.png"), str(tmp_path / "blank.png")
    Image.fromarray(astronaut()).save(photo)
    masks.main(["--show", photo, "--out", out])
    assert Image.open(out).size == (512, 512)
    Image.new("RGB", (300, 300), (90, 90, 90)).save(blank)
    with pytest.raises(ops.InputError, match="no face found"):
        masks.main(["--show", blank, "--out", out])


def write_video(path, frames):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with av.open(path, "w") as container:
        stream = container.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = frames[0].shape[1], frames[0].shape[0], "yuv420p"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())


@pytest.fixture(scope="module")
def face_video(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("video") / "face.mp4")
    write_video(path, [np.roll(astronaut(), 2 * t, axis=1) for t in range(6)])
    return path


@pytest.fixture(scope="module")
def ffpp(tmp_path_factory, face_video):
    """FF++ as downloaded: 6 real videos, two methods, one corrupt and one faceless fake, splits."""
    src = tmp_path_factory.mktemp("ffpp")
    real = src / "original_sequences" / "youtube" / "c23" / "videos"
    for name in ("000", "001", "002", "003", "004", "005"):
        os.makedirs(real, exist_ok=True)
        shutil.copy(face_video, real / f"{name}.mp4")
    for method in ("Deepfakes", "FaceSwap"):
        fakes = src / "manipulated_sequences" / method / "c23" / "videos"
        os.makedirs(fakes)
        for name in ("000_001", "001_000", "002_003", "003_002", "004_005", "005_004"):
            shutil.copy(face_video, fakes / f"{name}.mp4")
    (src / "manipulated_sequences/Deepfakes/c23/videos/001_000.mp4").write_bytes(os.urandom(4000))
    with wave.open(str(src / "manipulated_sequences/FaceSwap/c23/videos/005_004.mp4"), "wb") as audio_only:
        audio_only.setnchannels(1)  # a media file without a video stream
        audio_only.setsampwidth(2)
        audio_only.setframerate(8000)
        audio_only.writeframes(bytes(1600))
    write_video(str(src / "manipulated_sequences/FaceSwap/c23/videos/003_002.mp4"), [np.full((256, 256, 3), 90, np.uint8)] * 4)
    os.remove(real / "003.mp4")  # 003 as a folder of extracted frames instead of an mp4
    os.makedirs(real / "003")
    for t in range(4):
        Image.fromarray(np.roll(astronaut(), t, axis=1)).save(real / "003" / f"{t:04d}.png")
    os.makedirs(src / "splits")
    for split, pairs in (("train", [["000", "001"]]), ("val", [["002", "003"]]), ("test", [["004", "005"]])):
        (src / "splits" / f"{split}.json").write_text(json.dumps(pairs))
    root = str(src / "prepared")
    masks.main(["--data", "ff++", "--src", str(src), "--root", root, "--methods", "Deepfakes,FaceSwap",
                "--frames", "2", "--workers", "2"])
    return str(src), root


def manifest_counts(root):
    rows = open(os.path.join(root, "manifest.csv")).read().splitlines()[1:]
    counts = {}
    for row in rows:
        split, label = row.split(",")[:2]
        counts[split, int(label)] = counts.get((split, int(label)), 0) + 1
    return counts


def test_ffpp_prepares_to_the_right_counts_and_reports_bad_videos(ffpp):
    _, root = ffpp
    # train: reals 000, 001; fakes Deepfakes 000_001 (001_000 corrupt), FaceSwap 000_001, 001_000; 2 frames each
    # val: reals 002, 003 (003 a folder); fakes Deepfakes 002_003, 003_002, FaceSwap 002_003 (003_002 faceless)
    # test: reals 004, 005; fakes 004_005, 005_004 of both methods (FaceSwap 005_004 has no video stream)
    assert manifest_counts(root) == {("train", 0): 4, ("train", 1): 6, ("val", 0): 4, ("val", 1): 6,
                                     ("test", 0): 4, ("test", 1): 6}
    report = open(os.path.join(root, "report.txt")).read()
    assert "Deepfakes/001_000\tvideo\tunreadable video" in report
    assert "FaceSwap/003_002\tvideo\tno face in any of its 2 frames" in report
    assert "FaceSwap/003_002\tframe 1\tno face" in report
    assert "FaceSwap/005_004\tvideo\tfailed (ValueError: no video stream)" in report
    mask = np.asarray(Image.open(os.path.join(root, "masks/original/000/0001.png")))
    assert mask.shape == (256, 256) and set(np.unique(mask)) == {0, 255} and 0.2 < (mask > 0).mean() < 0.8


def test_restart_skips_finished_videos_and_redoes_a_half_written_one(ffpp, capsys):
    src, root = ffpp
    argv = ["--data", "ff++", "--src", src, "--root", root, "--methods", "Deepfakes,FaceSwap", "--frames", "2", "--workers", "1"]
    os.remove(os.path.join(root, "records/original/000.json"))  # killed after its frames, before its record
    open(os.path.join(root, "faces/original/000/0001.png.tmp999"), "w").close()
    before = manifest_counts(root)
    masks.main(argv)
    out = capsys.readouterr().out
    assert "16 already prepared, 2 to do (1 of them again)" in out and "prepared 2 frames" in out  # + the corrupt one
    assert manifest_counts(root) == before
    assert not os.path.exists(os.path.join(root, "faces/original/000/0001.png.tmp999"))  # cleaned up


@pytest.mark.parametrize("argv, expected", [
    (["--src", "/no/such/dir"], "/no/such/dir: not found; expected the FaceForensics++ download root"),
    (["--methods", "Deepfake"], "--methods: unknown ff++ method 'Deepfake'"),
    (["--splits", "/tmp/no-splits"], "/tmp/no-splits/train.json: not found; expected FaceForensics++'s official split file"),
    (["--compression", "c40"], "original_sequences/youtube/c40/videos: not found"),
    (["--benchmark", "--src", "/no/such/video.mp4"], "/no/such/video.mp4: no such video file"),
])
def test_bad_preparation_input_is_a_one_line_error(ffpp, argv, expected):
    src, root = ffpp
    if argv[0] == "--benchmark":
        code, _, err = run_cli("masks.py", *argv)
    else:
        flags = {"--src": src, "--methods": "Deepfakes", "--root": root, **dict(zip(argv[::2], argv[1::2]))}
        code, _, err = run_cli("masks.py", "--data", "ff++", *[v for kv in flags.items() for v in kv])
    assert code != 0
    one_line_error(err, expected)


@pytest.fixture(scope="module")
def celebdf(tmp_path_factory, face_video):
    src = tmp_path_factory.mktemp("celebdf")
    names = {"Celeb-real": ["id0_0000", "id1_0000", "id2_0000", "id3_0000"], "YouTube-real": ["00000", "00001"],
             "Celeb-synthesis": ["id0_id2_0000", "id1_id3_0000", "id0_id1_0000", "id2_id0_0001", "id3_id1_0001"]}
    for folder, files in names.items():
        os.makedirs(src / folder)
        for name in files:
            shutil.copy(face_video, src / folder / f"{name}.mp4")
    (src / "List_of_testing_videos.txt").write_text("1 YouTube-real/00001.mp4\n0 Celeb-synthesis/id2_id0_0001.mp4\n")
    root = str(src / "prepared")
    masks.main(["--data", "celeb-df", "--src", str(src), "--root", root, "--frames", "1", "--workers", "1"])
    return str(src), root


def test_celebdf_split_follows_the_test_list_and_keeps_identities_apart(celebdf):
    src, root = celebdf
    split = {f"{v.method}/{v.name}": v.split for v in masks.celebdf_videos(src)}
    # swaps outside the test list: id0-id2, id1-id3 (twice), id0-id1. Validation grows from id2 (the
    # fewest swaps cut), then id0 (completes id0_id2): a tenth of the fakes reached; its reals come along
    assert split == {"YouTube-real/00001": "test", "Celeb-synthesis/id2_id0_0001": "test",
                     "Celeb-real/id0_0000": "val", "Celeb-real/id2_0000": "val", "Celeb-synthesis/id0_id2_0000": "val",
                     "YouTube-real/00000": "train", "Celeb-real/id1_0000": "train", "Celeb-real/id3_0000": "train",
                     "Celeb-synthesis/id1_id3_0000": "train", "Celeb-synthesis/id3_id1_0001": "train"}
    # id0_id1_0000 mixes both sides: left out of both
    assert manifest_counts(root) == {("test", 0): 1, ("test", 1): 1, ("val", 0): 2, ("val", 1): 1, ("train", 0): 3,
                                     ("train", 1): 2}


def test_prepared_frames_read_as_balanced_uint8_samples(ffpp):
    _, root = ffpp
    train_set = masks.FaceCrops(root, "train", ["Deepfakes", "FaceSwap"], train=True, image_size=64)
    assert len(train_set) == 4 * 2 + 6  # 4 real frames repeated round(6/4) = 2 times
    image, mask, label, video = train_set[0]
    assert image.shape == (3, 64, 64) and mask.shape == (1, 64, 64) and set(mask.unique().tolist()) <= {0, 1}
    assert image.dtype == mask.dtype == torch.uint8 and label in (0, 1) and "/" in video
    # uint8 through the loader, normalised on the device == the float image read directly
    x, M, y = add.to_device(torch.utils.data.default_collate([train_set[i] for i in range(4)]), torch.device("cpu"))
    for i in range(4):
        r = train_set.rows[i]
        face = Image.open(os.path.join(root, r["image"])).convert("RGB").resize((64, 64), Image.BILINEAR)
        hull = Image.open(os.path.join(root, r["mask"])).resize((64, 64), Image.NEAREST)
        assert torch.equal(x[i], torch.from_numpy(np.asarray(face, dtype=np.float32) / 255).permute(2, 0, 1))
        assert torch.equal(M[i, 0], torch.from_numpy(np.asarray(hull) > 127).float())
    assert x.is_contiguous(memory_format=torch.channels_last) and y.tolist() == train_set.labels[:4]
    with pytest.raises(ops.InputError, match="run masks.py first"):
        masks.FaceCrops("/no/such/root", "train", ["Deepfakes"], True, 64)


def test_image_and_mask_flip_together_reproducibly():
    ds = masks.SyntheticFaces("train", ["swap"], 8, 1, 32, seed=0)
    x, M, y = add.to_device((ds.images, ds.masks, torch.tensor(ds.labels)), torch.device("cpu"))
    fx, fM, fy = add.to_device((ds.images, ds.masks, torch.tensor(ds.labels)), torch.device("cpu"), add.epoch_generator(0, 3))
    mirrored = [torch.equal(fx[i], x[i].flip(-1)) and torch.equal(fM[i], M[i].flip(-1)) for i in range(len(x))]
    same = [torch.equal(fx[i], x[i]) and torch.equal(fM[i], M[i]) for i in range(len(x))]
    assert all(a != b for a, b in zip(mirrored, same)) and 0 < sum(mirrored) < len(x) and torch.equal(fy, y)
    again = add.to_device((ds.images, ds.masks, torch.tensor(ds.labels)), torch.device("cpu"), add.epoch_generator(0, 3))
    assert torch.equal(again[0], fx)  # the same (seed, epoch): the same flips


@pytest.mark.parametrize("family", masks.SYNTHETIC_METHODS)
def test_synthetic_fakes_differ_from_their_source_only_in_and_near_the_face(family):
    for video in range(3):
        s = masks.synthetic_frame(0, video, 0, 64, family)
        diff = np.abs(s["fake"] - s["real"]).max(-1)
        assert diff[s["weight"] > 0.5].mean() > 0.01  # visibly changed inside the manipulated region
        near_face = binary_dilation(masks.hull_mask(s["fake_points"], 64), iterations=4)
        assert diff[~near_face].max() == 0  # untouched beyond 4 px (the feathering) of the face hull
    again = masks.synthetic_frame(0, 2, 0, 64, family)
    assert np.array_equal(again["fake"], s["fake"])  # deterministic by seed


def test_synthetic_landmarks_follow_dlibs_layout():
    pts = masks.synthetic_frame(0, 0, 0, 128)["real_points"]
    assert pts.shape == (68, 2)
    assert pts[0, 0] < pts[8, 0] < pts[16, 0] and pts[8, 1] > pts[30, 1] > pts[19, 1]  # jaw L->R, chin, nose, brow
    assert pts[36:42, 0].mean() < pts[42:48, 0].mean() and pts[48, 0] < pts[54, 0]  # eyes, mouth corners
    assert pts[51, 1] < pts[57, 1]  # upper lip above lower lip


# ----------------------------------------------------------------------------------------------
# add.py and train.py: the network, Eq. 7, evaluation, checkpoints, protocols

def test_add_outputs_logits_and_a_mask_in_unit_range():
    model = add.ADD(GENOTYPE, 4, add.d2_layout(2, 1), stem_reductions=2)
    logits, m = model(torch.rand(3, 3, 48, 48))
    assert logits.shape == (3, 2) and m.shape == (3, 1, 48, 48) and 0 <= m.min() and m.max() <= 1


def test_default_model_size_is_in_the_papers_range():
    cfg = dict(train.PAPER, arch="add", blocks=3, mask_weight=1.0)
    n = add.count_parameters(train.build_model(cfg, GENOTYPE))
    assert 4.5e6 < n < 6.5e6  # paper, Table IV: 5.6 M


def test_table_v_mask_weight_zero_keeps_the_branch_and_no_mask_branch_removes_it():
    args = train.parse_args(["--genotype", "unused.json", "--mask-weight", "0"])
    model = train.build_model(vars(args), GENOTYPE)  # Eq. 6 with an unsupervised m, Eq. 7 with alpha = 0
    logits, m = model(torch.rand(2, 3, 64, 64))
    assert model.heads.mask is not None and m.shape == (2, 1, 64, 64)
    y, ones, zeros = torch.tensor([0, 1]), torch.ones(2, 1, 64, 64), torch.zeros(2, 1, 64, 64)
    assert add.add_loss(*add.loss_terms(logits, m, y, ones), 0.0) == add.add_loss(*add.loss_terms(logits, m, y, zeros), 0.0)
    args = train.parse_args(["--genotype", "unused.json", "--no-mask-branch"])  # Eq. 4 alone
    model = train.build_model(vars(args), GENOTYPE)
    assert args.mask_weight == 0 and model.heads.mask is None and not any("heads.mask" in k for k in model.state_dict())
    assert model(torch.rand(2, 3, 64, 64))[1] is None


def test_loss_is_eq7():
    logits, labels = torch.randn(4, 2), torch.tensor([0, 1, 1, 0])
    m, M = torch.rand(4, 1, 8, 8), (torch.rand(4, 1, 8, 8) > 0.5).float()
    ce = -torch.log_softmax(logits, -1)[torch.arange(4), labels].mean()
    mse = ((M - m) ** 2).mean()
    assert torch.allclose(add.add_loss(*add.loss_terms(logits, m, labels, M), 10.0), ce + 10 * mse)
    assert add.loss_terms(logits, None, labels, M)[1] is None
    assert torch.allclose(add.add_loss(*add.loss_terms(logits, None, labels, M), 10.0), ce)


def test_thirty_training_steps_lower_the_loss():
    torch.manual_seed(0)
    model = add.ADD(GENOTYPE, 8, add.d2_layout(3, 1), stem_reductions=2)
    args = train.parse_args(["--genotype", "unused.json", "--lr", "2e-3", "--batch-size", "8"])
    optimizer, _ = train.make_optimizer(model, args)
    batch = tiny_batch(8, 32)
    first = train.train_epoch(model, [batch] * 5, optimizer, torch.device("cpu"), args, 0, train.Progress(5, 0))
    train.train_epoch(model, [batch] * 20, optimizer, torch.device("cpu"), args, 0, train.Progress(20, 0))
    last = train.train_epoch(model, [batch] * 5, optimizer, torch.device("cpu"), args, 0, train.Progress(5, 0))
    assert sum(last) < 0.6 * sum(first) and last[0] < 0.6 * first[0]  # Eq. 7, and its cross-entropy alone


def test_acc_auc_and_video_aggregation_match_hand_computation():
    probs = np.array([0.9, 0.7, 0.2, 0.4, 0.6, 0.1, 0.55, 0.3])
    labels = np.array([1, 1, 0, 0, 1, 0, 0, 1])
    pos, neg = probs[labels == 1], probs[labels == 0]
    auc = np.mean([1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg])  # Mann-Whitney
    acc = np.mean((probs > 0.5) == labels)
    got = train.scores(labels, probs)
    assert (got["acc"], got["auc"]) == pytest.approx((acc, auc))
    videos = ["b", "b", "a", "a", "c", "a", "d", "c"]
    video_probs, video_labels = train.video_level(probs, labels, videos)
    assert video_probs == pytest.approx([(0.2 + 0.4 + 0.1) / 3, 0.8, (0.6 + 0.3) / 2, 0.55])
    assert video_labels.tolist() == [0, 1, 1, 0]
    assert train.scores(np.array([1, 1]), np.array([0.7, 0.2]))["auc"] is None  # one class: no AUC


def test_checkpoint_round_trip_gives_identical_logits(tmp_path):
    torch.manual_seed(0)
    model = add.ADD(GENOTYPE, 4, add.d2_layout(2, 1), 2).eval()
    path = str(tmp_path / "m.pt")
    add.save_checkpoint(dict(model=model.state_dict()), path)
    again = add.ADD(GENOTYPE, 4, add.d2_layout(2, 1), 2).eval()
    add.load_state(again, add.load_checkpoint(path)["model"], path)
    x = torch.rand(2, 3, 32, 32)
    assert torch.equal(model(x)[0], again(x)[0])
    other = add.ADD(GENOTYPE, 8, add.d2_layout(2, 1), 2)
    with pytest.raises(ops.InputError, match="does not match this configuration"):
        add.load_state(other, add.load_checkpoint(path)["model"], path)


def test_training_resumes_at_the_right_epoch_and_stops_on_nan(tmp_path, genotype_file, monkeypatch, capsys):
    out = str(tmp_path / "run")
    argv = TINY_TRAIN + ["--genotype", genotype_file, "--epochs", "3", "--out", out]
    real_epoch = train.train_epoch

    def nan_in_epoch_2(model, data, optimizer, device, args, epoch, *rest):
        if epoch == 1:
            monkeypatch.setattr(train, "loss_terms", lambda logits, *a: (logits.sum() * float("nan"), None))
        return real_epoch(model, data, optimizer, device, args, epoch, *rest)

    monkeypatch.setattr(train, "train_epoch", nan_in_epoch_2)
    with pytest.raises(add.Diverged, match="non-finite loss at epoch 2, within steps 1-1"):
        train.main(argv)
    assert train.load_checkpoint(os.path.join(out, "last.pt"))["epoch"] == 1  # the last good one, intact
    monkeypatch.undo()
    metrics = train.main(argv + ["--resume"])
    assert "resumed" in capsys.readouterr().out
    assert [json.loads(line)["epoch"] for line in open(os.path.join(out, "log.jsonl"))] == [1, 2, 3]
    assert metrics["test"]["frames"] == 6 and os.path.exists(os.path.join(out, "masks.png"))


def test_protocols_cross_manipulation_eval_only_and_baseline(tmp_path, genotype_file):
    out = str(tmp_path / "run")
    metrics = train.main(TINY_TRAIN + ["--genotype", genotype_file, "--epochs", "1", "--out", out,
                                       "--methods", "swap", "--test-methods", "mouth,gan"])
    assert metrics["test"]["data"] == "synthetic:mouth,gan" and metrics["val"]["data"] == "synthetic:swap"
    again = train.main(TINY_TRAIN + ["--eval-only", "--checkpoint", os.path.join(out, "best.pt"), "--out", out,
                                     "--test-methods", "mouth,gan"])
    assert again["test"] == metrics["test"]
    base = train.main(TINY_TRAIN + ["--arch", "resnet18", "--epochs", "1", "--out", str(tmp_path / "r18")])
    assert base["parameters"] > 11e6 and base["mask_weight"] == 0.0


def test_cross_dataset_from_prepared_ffpp_to_celebdf(tmp_path, genotype_file, ffpp, celebdf):
    metrics = train.main(["--genotype", genotype_file, "--data", "ff++", "--root", ffpp[1], "--methods",
                          "Deepfakes,FaceSwap", "--test-data", "celeb-df", "--test-root", celebdf[1], "--image-size",
                          "32", "--channels", "4", "--cells-per-block", "1", "--stem-reductions", "2", "--epochs",
                          "1", "--batch-size", "4", "--workers", "0", "--log-every", "0", "--visualize", "0",
                          "--out", str(tmp_path / "run")])
    assert metrics["test"]["data"] == "celeb-df:Celeb-synthesis" and metrics["test"]["frames"] == 2


def test_search_reads_prepared_ffpp(tmp_path, ffpp):
    g = str(tmp_path / "g.json")
    model = search.main(["--data", "ff++", "--root", ffpp[1], "--methods", "Deepfakes,FaceSwap", "--image-size", "32",
                         "--channels", "4", "--cells", "3", "--stem-reductions", "2", "--batch-size", "4", "--epochs",
                         "1", "--workers", "0", "--out", g, "--run-dir", str(tmp_path / "run")])
    assert ops.load_genotype(g) == model.genotype()


def test_benchmarks_run(genotype_file, capsys):
    train.main(["--genotype", genotype_file, "--benchmark", "--image-size", "32", "--channels", "4", "--batch-size", "4"])
    search.main(TINY_SEARCH + ["--benchmark"])
    out = capsys.readouterr().out
    assert "images/s" in out and "search step" in out and "peak memory" in out


def test_a_batch_larger_than_the_training_split_is_an_error(tmp_path, genotype_file):
    with pytest.raises(ops.InputError, match="--batch-size 64: the train split has only 12 samples"):
        train.main(TINY_TRAIN + ["--genotype", genotype_file, "--batch-size", "64", "--out", str(tmp_path)])


def test_bad_genotype_and_checkpoint_paths_are_one_line_errors(tmp_path):
    code, _, err = run_cli("train.py", "--genotype", str(tmp_path / "missing.json"))
    assert code == 1
    one_line_error(err, "missing.json: no such genotype file")
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint")
    code, _, err = run_cli("train.py", "--eval-only", "--checkpoint", str(corrupt))
    assert code == 1
    one_line_error(err, "corrupt.pt: not a readable checkpoint")


def test_two_process_torchrun_on_cpu_completes(tmp_path, genotype_file):
    out = str(tmp_path / "ddp")
    code, stdout, err = run_cli("-m", "torch.distributed.run", "--nproc_per_node", "2", "train.py", *TINY_TRAIN,
                                "--genotype", genotype_file, "--epochs", "1", "--device", "cpu", "--out", out)
    assert code == 0, err[-2000:]
    assert "2 process(es) on cpu" in stdout and stdout.count("epoch 1/1") == 1  # only rank 0 logs
    assert json.load(open(os.path.join(out, "metrics.json")))["test"]["frames"] == 6


# ----------------------------------------------------------------------------------------------
# The README's main job, end to end at a reduced size

def test_readme_demo_search_then_train(tmp_path):
    code, out, err = run_cli(os.path.join(HERE, "search.py"), *TINY_SEARCH, "--epochs", "1", cwd=tmp_path)
    assert code == 0, err
    assert ops.load_genotype(str(tmp_path / "g.json")) and os.path.exists(tmp_path / "g.png")
    code, out, err = run_cli(os.path.join(HERE, "train.py"), "--genotype", "g.json", *TINY_TRAIN, "--epochs", "1",
                             cwd=tmp_path)
    assert code == 0, err
    assert "frame_auc" in out and json.load(open(tmp_path / "runs/train/metrics.json"))["test"]["frame_auc"] is not None
    assert os.path.exists(tmp_path / "runs/train/masks.png")
    assert json.load(open(tmp_path / "runs/search/config.json"))["image_size"] == 32  # the effective config, saved
