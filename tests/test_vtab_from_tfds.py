"""scripts/vtab_from_tfds.py on fake TFDS folders written here by an independent TFRecord / Example writer."""
import importlib.util
import io
import json
import struct

import pytest
from PIL import Image

from tests.helpers import ROOT, run_script

SCRIPT = ROOT / "scripts" / "vtab_from_tfds.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("vtab_from_tfds", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


vtab = _load_script()


# ------------------------------------------------------------------ an independent writer

def crc32c_bitwise(data):
    """Reference CRC32C, one bit at a time (no table), to cross-check the script's table-driven one."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def masked(data):
    crc = crc32c_bitwise(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def varint(n):
    n &= (1 << 64) - 1  # negative int64: ten-byte two's complement
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def delimited(number, payload):
    return varint(number << 3 | 2) + varint(len(payload)) + payload


def feature(kind, values, packed=True):
    """A serialized tf.train.Feature."""
    if kind == "bytes":
        body = b"".join(delimited(1, v) for v in values)
        return delimited(1, body)
    if kind == "float":
        if packed:
            body = delimited(1, struct.pack(f"<{len(values)}f", *values))
        else:
            body = b"".join(varint(1 << 3 | 5) + struct.pack("<f", v) for v in values)
        return delimited(2, body)
    if packed:
        body = delimited(1, b"".join(varint(v) for v in values))
    else:
        body = b"".join(varint(1 << 3 | 0) + varint(v) for v in values)
    return delimited(3, body)


def example(features):
    """A serialized tf.train.Example from {key: serialized Feature}; an unknown field is added to skip."""
    entries = b"".join(delimited(1, delimited(1, k.encode()) + delimited(2, f)) for k, f in features.items())
    return delimited(1, entries) + varint(7 << 3 | 0) + varint(12345)


def frame(record):
    length = struct.pack("<Q", len(record))
    return length + struct.pack("<I", masked(length)) + record + struct.pack("<I", masked(record))


def write_split(version_dir, builder, split, shards):
    """Write shards (lists of serialized Examples) as <builder>-<split>.tfrecord-0000i-of-0000n."""
    paths = []
    for i, records in enumerate(shards):
        path = version_dir / f"{builder}-{split}.tfrecord-{i:05d}-of-{len(shards):05d}"
        path.write_bytes(b"".join(frame(r) for r in records))
        paths.append(path)
    return paths


def image_bytes(i):
    """A tiny distinct image: PNG for even i, JPEG for odd i."""
    out = io.BytesIO()
    Image.new("RGB", (4, 4), (i * 7 % 256, 255 - i, 3)).save(out, format="PNG" if i % 2 == 0 else "JPEG")
    return out.getvalue()


def chunks(items, sizes):
    out, pos = [], 0
    for n in sizes:
        out.append(items[pos:pos + n])
        pos += n
    return out


# ------------------------------------------------------------------ fake datasets

CIFAR_TRAIN_SHARDS = [5, 6, 9]  # 20 examples: VTAB train = train[:18], val = train[18:]
CIFAR_TEST_SHARDS = [3, 2]


def make_cifar(root, info=True):
    """A fake cifar100/3.0.2 folder; returns {split: [(image bytes, label)]} in TFDS order."""
    version_dir = root / "cifar100" / "3.0.2"
    version_dir.mkdir(parents=True)
    truth, splits = {}, []
    for split, sizes, label0 in (("train", CIFAR_TRAIN_SHARDS, 0), ("test", CIFAR_TEST_SHARDS, 50)):
        items = [(image_bytes(label0 + i), label0 + i) for i in range(sum(sizes))]
        records = [example({"id": feature("bytes", [b"x%d" % i]), "image": feature("bytes", [img]),
                            "label": feature("int64", [label], packed=i % 2 == 0)})
                   for i, (img, label) in enumerate(items)]
        write_split(version_dir, "cifar100", split, chunks(records, sizes))
        truth[split] = items
        splits.append({"name": split, "shardLengths": [str(n) for n in sizes]})
    if info:
        (version_dir / "dataset_info.json").write_text(json.dumps({"name": "cifar100", "splits": splits}))
    return truth


def clevr_record(i, n_objects, depths):
    coords = [v for d in depths for v in (10.0, 20.0, d)]
    return example({"image": feature("bytes", [image_bytes(i)]),
                    "objects/size": feature("int64", [1] * n_objects),
                    "objects/pixel_coords": feature("float", coords, packed=i % 2 == 1)})


def make_clevr(root):
    """A fake clevr/3.1.0 folder without dataset_info.json; returns {split: [(n_objects, depths)]}."""
    version_dir = root / "clevr" / "3.1.0"
    version_dir.mkdir(parents=True)
    depth_sets = [[12.0, 8.7, 9.9], [7.5, 11.0, 12.0, 13.0], [9.2, 9.7, 10.5], [10.1, 11.0, 50.0, 60.0, 70.0]]
    truth = {}
    for split, sizes in (("train", [6, 4]), ("validation", [3])):
        items = [(3 + (i % 8), depth_sets[i % 4] + [20.0] * (i % 8)) for i in range(sum(sizes))]
        records = [clevr_record(i, n, d) for i, (n, d) in enumerate(items)]
        write_split(version_dir, "clevr", split, chunks(records, sizes))
        truth[split] = items
    return truth


def read_list(path):
    return [line.split(" ") for line in path.read_text().splitlines()]


def convert(tmp_path, *args):
    return run_script(SCRIPT, "--tfds-dir", tmp_path / "tfds", "--out", tmp_path / "out", *args, check=False)


def assert_failed_cleanly(proc, out, task):
    """Exit code 1, one `error:` line, and no task folder (complete-looking or partial) left."""
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (out / task).exists() and not (out / f"{task}.partial").exists()
    return lines[0]


# ------------------------------------------------------------------ tests

def test_crc32c_matches_reference():
    assert crc32c_bitwise(b"123456789") == 0xE3069283
    assert vtab.crc32c(b"123456789") == 0xE3069283
    for data in (b"", b"\x00" * 33, bytes(range(256)), image_bytes(3)):
        assert vtab.crc32c(data) == crc32c_bitwise(data)
        assert vtab.masked_crc32c(data) == masked(data)


def test_parse_example_wire_forms():
    record = example({"neg": feature("int64", [-1, -(1 << 63), 5], packed=False),
                      "packed": feature("int64", [300, -2]),
                      "f": feature("float", [0.5, -2.25], packed=False),
                      "b": feature("bytes", [b"", b"abc"])})
    parsed = vtab.parse_example(record)
    assert parsed["neg"] == ("int64", [-1, -(1 << 63), 5])
    assert parsed["packed"] == ("int64", [300, -2])
    assert parsed["f"] == ("float", [0.5, -2.25])
    assert parsed["b"] == ("bytes", [b"", b"abc"])


@pytest.mark.parametrize("data", [
    b"\x0a\xff\xff\xff\xff\x0f",                 # Features field claiming ~4 GB
    b"\x0a\x05\x0a\x03",                         # nested length past its parent
    b"\x08" + b"\xff" * 11,                      # varint longer than 10 bytes
    b"\x08\xff",                                 # varint cut short
    b"\x0b\x00",                                 # group wire type
    b"\x00\x01",                                 # field number 0
])
def test_parse_example_rejects_bad_bytes(data):
    with pytest.raises(ValueError):
        vtab.parse_example(data)


def test_tfrecord_lying_length_is_rejected(tmp_path):
    length = struct.pack("<Q", 1 << 40)
    path = tmp_path / "lying.tfrecord"
    path.write_bytes(length + struct.pack("<I", masked(length)) + b"abc")
    with pytest.raises(ValueError, match="claims"):
        list(vtab.iter_records(str(path)))


@pytest.mark.parametrize("info", [True, False], ids=["dataset_info", "counted"])
def test_cifar100_splits_images_and_order(tmp_path, info):
    truth = make_cifar(tmp_path / "tfds", info=info)
    proc = convert(tmp_path, "--tasks", "cifar100", "--split-sizes", "8,2")
    assert proc.returncode == 0, proc.stderr
    task = tmp_path / "out" / "cifar100"
    expected = {"train800": truth["train"][:8],        # crosses shard 0 -> 1
                "val200": truth["train"][18:20],       # train[90% of 20:], in the last shard
                "test": truth["test"]}                 # both test shards, in order
    for split, items in expected.items():
        rows = read_list(task / f"{split}.txt")
        assert len(rows) == len(items)
        for index, ((name, label), (img, true_label)) in enumerate(zip(rows, items)):
            ext = "png" if img.startswith(b"\x89PNG") else "jpg"
            assert name == f"images/{split}_{index}.{ext}"
            assert int(label) == true_label
            assert (task / name).read_bytes() == img
    assert (task / "train800val200.txt").read_text() == \
        (task / "train800.txt").read_text() + (task / "val200.txt").read_text()
    assert sorted(p.name for p in task.iterdir()) == \
        ["images", "test.txt", "train800.txt", "train800val200.txt", "val200.txt"]
    assert not (tmp_path / "out" / "cifar100.partial").exists()


def test_test_limit_and_existing_output(tmp_path):
    make_cifar(tmp_path / "tfds")
    assert convert(tmp_path, "--tasks", "cifar100", "--split-sizes", "8,2", "--test-limit", "3").returncode == 0
    assert len(read_list(tmp_path / "out" / "cifar100" / "test.txt")) == 3
    again = convert(tmp_path, "--tasks", "cifar100", "--split-sizes", "8,2")
    assert again.returncode == 1 and "--overwrite" in again.stderr
    assert convert(tmp_path, "--tasks", "cifar100", "--split-sizes", "8,2", "--overwrite").returncode == 0
    assert len(read_list(tmp_path / "out" / "cifar100" / "test.txt")) == 5


def test_clevr_labels(tmp_path):
    truth = make_clevr(tmp_path / "tfds")
    proc = convert(tmp_path, "--tasks", "clevr_count", "clevr_distance", "--split-sizes", "4,1")
    assert proc.returncode == 0, proc.stderr
    thresholds = [0.0, 8.0, 8.5, 9.0, 9.5, 10.0, 100.0]
    for split, items in (("train800", truth["train"][:4]), ("val200", truth["train"][9:10]),
                         ("test", truth["validation"])):
        counts = [int(label) for _, label in read_list(tmp_path / "out" / "clevr_count" / f"{split}.txt")]
        assert counts == [n - 3 for n, _ in items]
        dists = [int(label) for _, label in read_list(tmp_path / "out" / "clevr_distance" / f"{split}.txt")]
        assert dists == [max(i for i, t in enumerate(thresholds) if t < min(d)) for _, d in items]
    # the hand-worked cases: 8.7 -> bin 2 (8.5, 9.0], 7.5 -> bin 0 (0, 8.0], 9.2 -> bin 3 (9.0, 9.5]
    assert dists[:3] == [2, 0, 3]


def test_corrupt_data_crc(tmp_path):
    make_cifar(tmp_path / "tfds")
    shard = tmp_path / "tfds" / "cifar100" / "3.0.2" / "cifar100-train.tfrecord-00001-of-00003"
    data = bytearray(shard.read_bytes())
    data[12 + 5] ^= 0x40  # inside record 0's data: train example 5
    shard.write_bytes(bytes(data))
    line = assert_failed_cleanly(convert(tmp_path, "--tasks", "cifar100", "--split-sizes", "8,2"),
                                 tmp_path / "out", "cifar100")
    assert shard.name in line and "record 0" in line and "checksum" in line


def test_truncated_shard(tmp_path):
    make_cifar(tmp_path / "tfds")
    shard = tmp_path / "tfds" / "cifar100" / "3.0.2" / "cifar100-test.tfrecord-00001-of-00002"
    shard.write_bytes(shard.read_bytes()[:-30])
    line = assert_failed_cleanly(convert(tmp_path, "--tasks", "cifar100", "--split-sizes", "8,2"),
                                 tmp_path / "out", "cifar100")
    assert shard.name in line and "truncated" in line


def test_missing_dataset_folder(tmp_path):
    (tmp_path / "tfds").mkdir()
    line = assert_failed_cleanly(convert(tmp_path, "--tasks", "dtd"), tmp_path / "out", "dtd")
    assert str(tmp_path / "tfds" / "dtd") in line


def test_label_outside_classes(tmp_path):
    version_dir = tmp_path / "tfds" / "cifar100" / "3.0.2"
    version_dir.mkdir(parents=True)
    bad = [example({"image": feature("bytes", [image_bytes(i)]), "label": feature("int64", [-1 if i == 2 else 1])})
           for i in range(20)]
    write_split(version_dir, "cifar100", "train", [bad])
    write_split(version_dir, "cifar100", "test", [bad[:3]])
    line = assert_failed_cleanly(convert(tmp_path, "--tasks", "cifar100", "--split-sizes", "8,2"),
                                 tmp_path / "out", "cifar100")
    assert "train800 example 2" in line and "-1" in line


def test_dsprites_bins_and_pixel_scaling(tmp_path):
    version_dir = tmp_path / "tfds" / "dsprites" / "2.0.0"
    version_dir.mkdir(parents=True)
    records = []
    for i in range(10):  # VTAB train = train[:8], val = train[8:9], test = train[9:]
        out = io.BytesIO()
        Image.new("L", (4, 4), i % 2).save(out, format="PNG")
        records.append(example({"image": feature("bytes", [out.getvalue()]),
                                "label_x_position": feature("int64", [3 * i]),
                                "label_orientation": feature("int64", [4 * i])}))
    write_split(version_dir, "dsprites", "train", chunks(records, [4, 6]))
    proc = convert(tmp_path, "--tasks", "dsprites_location", "dsprites_orientation", "--split-sizes", "4,1")
    assert proc.returncode == 0, proc.stderr
    indices = {"train800": [0, 1, 2, 3], "val200": [8], "test": [9]}
    for split, idx in indices.items():
        location = read_list(tmp_path / "out" / "dsprites_location" / f"{split}.txt")
        orientation = read_list(tmp_path / "out" / "dsprites_orientation" / f"{split}.txt")
        assert [int(label) for _, label in location] == [3 * i * 16 // 32 for i in idx]
        assert [int(label) for _, label in orientation] == [4 * i * 16 // 40 for i in idx]
        for (name, _), i in zip(location, idx):
            with Image.open(tmp_path / "out" / "dsprites_location" / name) as image:
                assert image.mode == "L" and image.getextrema() == ((255, 255) if i % 2 else (0, 0))
