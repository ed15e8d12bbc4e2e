"""Converts VTAB-1k datasets prepared by TensorFlow Datasets (TFDS) into this project's task folders.

Input: the TFRecord shards that TFDS writes when a dataset is prepared, e.g.
`~/tensorflow_datasets/caltech101/3.0.1/caltech101-train.tfrecord-00000-of-00002`, next to that
version's `dataset_info.json`. TensorFlow is not needed: the TFRecord framing (length, masked CRC32C
of the length, data, masked CRC32C of the data) and the `tf.train.Example` protobufs are decoded here.
Every record that is converted has both checksums verified; records that are only skipped over have
their length checksum verified.

Splits (VTAB-1k, Zhai et al. 2019): each of the 19 tasks defines its VTAB train, val and test splits as
slices of TFDS splits (the TASKS table below; each entry names the file of the VTAB reference code,
google-research/task_adaptation, task_adaptation/data/, it follows). `train800` is the first 800
examples of the VTAB train split, `val200` the first 200 of the VTAB val split, `test` the whole VTAB
test split, and `train800val200` the union of the first two. A TFDS split is the concatenation of its
shards in index order, so "the first 800" means the first 800 records in that order. Labels are the
TFDS label feature, or the VTAB task's label derived from the annotations (CLEVR object count - 3,
CLEVR / KITTI distance bins, dSprites position / orientation binned into 16 classes).

Output, one folder per task under --out:

    <out>/<task>/images/<split>_<index>.<ext>    the encoded image bytes as stored by TFDS (.jpg / .png)
    <out>/<task>/train800.txt                     lines `images/<file> <label>`
    <out>/<task>/val200.txt
    <out>/<task>/train800val200.txt               train800 then val200
    <out>/<task>/test.txt

dSprites stores its binary images with pixel values 0/1; VTAB multiplies them by 255, and so does this
converter (the only task whose images are re-encoded, as grayscale PNG). A task is written under
`<out>/<task>.partial` and renamed to `<out>/<task>` only once complete, so an interrupted or failed
conversion never leaves a folder that looks finished.

Example:

    python scripts/vtab_from_tfds.py --tfds-dir ~/tensorflow_datasets --out data/vtab-1k \\
        --tasks caltech101 cifar100 clevr_count
"""
import argparse
import glob
import io
import json
import os
import re
import shutil
import struct
import sys

# --------------------------------------------------------------------------------------------------
# The 19 VTAB-1k tasks. Keys of each entry:
#   folder   TFDS dataset folder under --tfds-dir (builder name, plus config for configured builders)
#   version  the TFDS version prefix the VTAB code asks for ("3." = any 3.x.y; the highest present wins)
#   image    the image feature's key
#   train    TFDS split whose first examples are VTAB's train (train800 = its first 800)
#   val      (TFDS split, start): VTAB's val begins at `start` of that split (val200 = 200 from there)
#   test     (TFDS split, start): VTAB's test runs from `start` to the end of that split
#   label    how the label is read (see LABEL_KINDS); num_classes bounds it
# A start is 0, ("floor", p1, p2, ...) = sum(p * n // 100) with n the TFDS split's size (VTAB computes
# its slice bounds this way), or ("percent", p) = a TFDS percent slice, accepted only when p% of n is
# a whole number (TFDS's rounding is not reproduced).
# --------------------------------------------------------------------------------------------------
_KEY = {"kind": "key", "key": "label"}

TASKS = {
    # caltech.py: train = train[:90%], val = the rest of train, test = test
    "caltech101": dict(folder="caltech101", version="3.", image="image", train="train",
                       val=("train", ("floor", 90)), test=("test", 0), label=_KEY, num_classes=102),
    # cifar.py (num_classes=100): train = train[:90%], val = the rest of train, test = test
    "cifar100": dict(folder="cifar100", version="3.", image="image", train="train",
                     val=("train", ("floor", 90)), test=("test", 0), label=_KEY, num_classes=100),
    # dtd.py: train / validation / test as in TFDS
    "dtd": dict(folder="dtd", version="3.", image="image", train="train",
                val=("validation", 0), test=("test", 0), label=_KEY, num_classes=47),
    # oxford_flowers102.py (default: no train_split_percent): train / validation / test as in TFDS
    "oxford_flowers102": dict(folder="oxford_flowers102", version="2.", image="image", train="train",
                              val=("validation", 0), test=("test", 0), label=_KEY, num_classes=102),
    # oxford_iiit_pet.py: train = train[:80%], val = the rest of train, test = test
    "oxford_iiit_pet": dict(folder="oxford_iiit_pet", version="3.", image="image", train="train",
                            val=("train", ("floor", 80)), test=("test", 0), label=_KEY, num_classes=37),
    # svhn.py (TFDS svhn_cropped): train = train[:90%], val = the rest of train, test = test
    "svhn": dict(folder="svhn_cropped", version="3.", image="image", train="train",
                 val=("train", ("floor", 90)), test=("test", 0), label=_KEY, num_classes=10),
    # sun397.py (config "tfds"): train / validation / test as in TFDS
    "sun397": dict(folder="sun397/tfds", version="4.", image="image", train="train",
                   val=("validation", 0), test=("test", 0), label=_KEY, num_classes=397),
    # patch_camelyon.py: train / validation / test as in TFDS
    "patch_camelyon": dict(folder="patch_camelyon", version="2.", image="image", train="train",
                           val=("validation", 0), test=("test", 0), label=_KEY, num_classes=2),
    # eurosat.py (subset "rgb"): train = train[:60%], val = the next 20%, test = the last 20%
    "eurosat": dict(folder="eurosat/rgb", version="2.", image="image", train="train",
                    val=("train", ("floor", 60)), test=("train", ("floor", 60, 20)), label=_KEY,
                    num_classes=10),
    # resisc45.py: train = train[:60%], val = the next 20%, test = the last 20%
    "resisc45": dict(folder="resisc45", version="3.", image="image", train="train",
                     val=("train", ("floor", 60)), test=("train", ("floor", 60, 20)), label=_KEY,
                     num_classes=45),
    # diabetic_retinopathy.py (config "btgraham-300"): train / validation / test as in TFDS
    "diabetic_retinopathy": dict(folder="diabetic_retinopathy_detection/btgraham-300", version="3.",
                                 image="image", train="train", val=("validation", 0), test=("test", 0),
                                 label=_KEY, num_classes=5),
    # clevr.py task "count_all": label = number of objects - 3; test = TFDS validation
    "clevr_count": dict(folder="clevr", version="3.", image="image", train="train",
                        val=("train", ("floor", 90)), test=("validation", 0),
                        label={"kind": "count", "key": "objects/size", "offset": 3}, num_classes=8),
    # clevr.py task "closest_object_distance": label = bin of the smallest depth (pixel_coords[:, 2])
    "clevr_distance": dict(folder="clevr", version="3.", image="image", train="train",
                           val=("train", ("floor", 90)), test=("validation", 0),
                           label={"kind": "min_bin", "key": "objects/pixel_coords", "width": 3, "column": 2,
                                  "thresholds": [0.0, 8.0, 8.5, 9.0, 9.5, 10.0, 100.0]},
                           num_classes=6),
    # dmlab.py (dmlab:2.0.1): train / validation / test as in TFDS
    "dmlab": dict(folder="dmlab", version="2.0.1", image="image", train="train",
                  val=("validation", 0), test=("test", 0), label=_KEY, num_classes=6),
    # dsprites.py (label_x_position, num_classes=16): train = train[:80%], val = the next 10%,
    # test = the rest; 32 positions binned into 16 classes; pixels 0/1 scaled to 0/255
    "dsprites_location": dict(folder="dsprites", version="2.", image="image", train="train",
                              val=("train", ("floor", 80)), test=("train", ("floor", 80, 10)),
                              label={"kind": "bin", "key": "label_x_position", "classes_in": 32},
                              num_classes=16, scale_pixels=255),
    # dsprites.py (label_orientation, num_classes=16): as above; 40 orientations binned into 16 classes
    "dsprites_orientation": dict(folder="dsprites", version="2.", image="image", train="train",
                                 val=("train", ("floor", 80)), test=("train", ("floor", 80, 10)),
                                 label={"kind": "bin", "key": "label_orientation", "classes_in": 40},
                                 num_classes=16, scale_pixels=255),
    # smallnorb.py (label_azimuth): train = train, val = test[:50%], test = test[50%:]
    "smallnorb_azimuth": dict(folder="smallnorb", version="2.", image="image", train="train",
                              val=("test", 0), test=("test", ("percent", 50)),
                              label={"kind": "key", "key": "label_azimuth"}, num_classes=18),
    # smallnorb.py (label_elevation): as above
    "smallnorb_elevation": dict(folder="smallnorb", version="2.", image="image", train="train",
                                val=("test", 0), test=("test", ("percent", 50)),
                                label={"kind": "key", "key": "label_elevation"}, num_classes=9),
    # kitti.py (kitti:3.1.0) task "closest_vehicle_distance": bin of the smallest depth
    # (location[:, 2]) among objects of type < 3 (car, van, truck), 1000 when there is none
    "kitti_distance": dict(folder="kitti", version="3.1.0", image="image", train="train",
                           val=("validation", 0), test=("test", 0),
                           label={"kind": "min_bin", "key": "objects/location", "width": 3, "column": 2,
                                  "filter_key": "objects/type", "filter_below": 3, "empty": 1000.0,
                                  "thresholds": [-100.0, 8.0, 20.0, 999.0]},
                           num_classes=4),
}

SPLIT_NAMES = ("train800", "val200", "test")

# ------------------------------------------------------------------------------------- CRC32C

_CRC32C_POLY = 0x82F63B78  # Castagnoli polynomial, bit-reversed


def _crc32c_table():
    """The 256-entry lookup table of the reflected CRC32C."""
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ _CRC32C_POLY if crc & 1 else crc >> 1
        table.append(crc)
    return table


_CRC32C_TABLE = _crc32c_table()


def crc32c(data):
    """CRC32C (Castagnoli) of `data`, one table lookup per byte."""
    crc = 0xFFFFFFFF
    table = _CRC32C_TABLE
    for byte in data:
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc32c(data):
    """The masked CRC32C TFRecord stores: rotate right by 15 bits, add a constant."""
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


# ------------------------------------------------------------------------------------- TFRecord

def _read_exact(f, n, path, index, what):
    """Read exactly n bytes or raise: the file ends inside record `index`."""
    data = f.read(n)
    if len(data) != n:
        raise ValueError(f"{path} is truncated: record {index} ends inside its {what}.")
    return data


def _read_header(f, path, index, size):
    """Read one record's length (checking its CRC and that it fits in the file); None at a clean end."""
    header = f.read(12)
    if not header:
        return None
    if len(header) != 12:
        raise ValueError(f"{path} is truncated: record {index} ends inside its header.")
    length, length_crc = struct.unpack("<QI", header)
    if masked_crc32c(header[:8]) != length_crc:
        raise ValueError(f"{path} is corrupt: the length checksum of record {index} does not match.")
    if length + 4 > size - f.tell():
        raise ValueError(f"{path} is truncated or corrupt: record {index} claims {length} bytes, "
                         f"more than the file has left.")
    return length


def iter_records(path, skip=0, verify=True):
    """Yield the data of each record of a TFRecord file after the first `skip` (skipped: length CRC only)."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        index = 0
        while True:
            length = _read_header(f, path, index, size)
            if length is None:
                return
            if index < skip:
                f.seek(length + 4, os.SEEK_CUR)
            else:
                data = _read_exact(f, length, path, index, "data")
                data_crc, = struct.unpack("<I", _read_exact(f, 4, path, index, "data checksum"))
                if verify and masked_crc32c(data) != data_crc:
                    raise ValueError(f"{path} is corrupt: the data checksum of record {index} does not match.")
                yield data
            index += 1


def count_records(path):
    """Number of records in a TFRecord file (framing and length checksums only)."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        count = 0
        while (length := _read_header(f, path, count, size)) is not None:
            f.seek(length + 4, os.SEEK_CUR)
            count += 1
    return count


# ------------------------------------------------------------------------------------- protobuf

def _varint(buf, pos):
    """Decode a base-128 varint at `pos`; returns (value, next position)."""
    value = shift = 0
    while True:
        if pos >= len(buf):
            raise ValueError("a varint runs past the end of its message")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            break
        shift += 7
        if shift >= 70:
            raise ValueError("a varint is longer than 10 bytes")
    if value >= 1 << 64:
        raise ValueError("a varint does not fit in 64 bits")
    return value, pos


def iter_fields(buf):
    """Yield (field number, wire type, value) of a protobuf message; value is int or bytes.

    Wire types: 0 varint (int), 1 fixed64 and 5 fixed32 (raw little-endian bytes), 2 length-delimited
    (bytes). Groups (3, 4) and unknown wire types are rejected."""
    pos, end = 0, len(buf)
    while pos < end:
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise ValueError("a protobuf field has number 0")
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire in (1, 5):
            width = 8 if wire == 1 else 4
            if pos + width > end:
                raise ValueError("a fixed-width protobuf field runs past the end of its message")
            value, pos = bytes(buf[pos:pos + width]), pos + width
        elif wire == 2:
            length, pos = _varint(buf, pos)
            if length > end - pos:
                raise ValueError("a length-delimited protobuf field claims more bytes than its message has")
            value, pos = buf[pos:pos + length], pos + length
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield number, wire, value


def _signed64(value):
    """Two's complement reading of a 64-bit varint (int64 fields)."""
    return value - (1 << 64) if value >= 1 << 63 else value


def _int64_values(wire, value):
    """int64 values of one Int64List field occurrence (packed or not)."""
    if wire == 0:
        return [_signed64(value)]
    if wire != 2:
        raise ValueError("an Int64List value has the wrong wire type")
    out, pos = [], 0
    while pos < len(value):
        v, pos = _varint(value, pos)
        out.append(_signed64(v))
    return out


def _float_values(wire, value):
    """float values of one FloatList field occurrence (packed or not)."""
    if wire not in (2, 5):
        raise ValueError("a FloatList value has the wrong wire type")
    if len(value) % 4:
        raise ValueError("a packed FloatList's length is not a multiple of 4")
    return list(struct.unpack(f"<{len(value) // 4}f", value))


def parse_feature(buf):
    """Decode a tf.train.Feature into (kind, values), kind in {"bytes", "float", "int64", None}."""
    kind, values = None, []
    for number, wire, value in iter_fields(buf):
        if number not in (1, 2, 3):
            continue
        if wire != 2:
            raise ValueError("a Feature's list has the wrong wire type")
        new_kind = {1: "bytes", 2: "float", 3: "int64"}[number]
        if new_kind != kind:  # a oneof: the last kind set wins, the same kind merges
            kind, values = new_kind, []
        for n, w, v in iter_fields(value):
            if n != 1:
                continue
            if kind == "bytes":
                if w != 2:
                    raise ValueError("a BytesList value has the wrong wire type")
                values.append(bytes(v))
            elif kind == "float":
                values.extend(_float_values(w, v))
            else:
                values.extend(_int64_values(w, v))
    return kind, values


def parse_example(buf):
    """Decode a serialized tf.train.Example into {key: (kind, values)}."""
    features = {}
    for number, wire, value in iter_fields(memoryview(buf)):
        if number != 1:
            continue
        if wire != 2:
            raise ValueError("an Example's features field has the wrong wire type")
        for n, w, entry in iter_fields(value):
            if n != 1:
                continue
            if w != 2:
                raise ValueError("a Features map entry has the wrong wire type")
            key, feature = "", b""
            for en, ew, ev in iter_fields(entry):
                if ew == 2 and en == 1:
                    key = bytes(ev).decode("utf-8", errors="replace")
                elif ew == 2 and en == 2:
                    feature = ev
            features[key] = parse_feature(feature)
    return features


# ------------------------------------------------------------------------------------- labels

def _get(features, key, kind):
    """The values of feature `key`, which must be of `kind`."""
    if key not in features:
        raise ValueError(f"has no feature '{key}'")
    got, values = features[key]
    if got not in (kind, None):
        raise ValueError(f"feature '{key}' holds {got} values, not {kind}")
    return values


def _scalar(features, key):
    values = _get(features, key, "int64")
    if len(values) != 1:
        raise ValueError(f"feature '{key}' holds {len(values)} values, not one")
    return values[0]


def _bin_index(value, thresholds):
    """Largest i with thresholds[i] < value (VTAB's distance bins)."""
    below = [i for i, t in enumerate(thresholds) if t < value]
    if not below:
        raise ValueError(f"distance {value} lies below the first bin")
    return below[-1]


def _min_bin_label(features, rule):
    """Bin of the smallest value in one column of a flattened (n, width) float feature."""
    flat = _get(features, rule["key"], "float")
    width, column = rule["width"], rule["column"]
    if len(flat) % width:
        raise ValueError(f"feature '{rule['key']}' holds {len(flat)} values, not rows of {width}")
    column_values = flat[column::width]
    if "filter_key" in rule:
        kinds = _get(features, rule["filter_key"], "int64")
        if len(kinds) != len(column_values):
            raise ValueError(f"features '{rule['filter_key']}' and '{rule['key']}' disagree on the object count")
        column_values = [v for v, k in zip(column_values, kinds) if k < rule["filter_below"]]
    if "empty" in rule:
        column_values = column_values + [rule["empty"]]
    if not column_values:
        raise ValueError(f"feature '{rule['key']}' is empty")
    return _bin_index(min(column_values), rule["thresholds"])


def label_of(features, task):
    """The VTAB label of one decoded example, checked against the task's number of classes."""
    rule = task["label"]
    if rule["kind"] == "key":
        label = _scalar(features, rule["key"])
    elif rule["kind"] == "count":
        label = len(_get(features, rule["key"], "int64")) - rule["offset"]
    elif rule["kind"] == "bin":
        label = _scalar(features, rule["key"]) * task["num_classes"] // rule["classes_in"]
    elif rule["kind"] == "min_bin":
        label = _min_bin_label(features, rule)
    else:
        raise ValueError(f"unknown label rule {rule['kind']}")
    if not 0 <= label < task["num_classes"]:
        raise ValueError(f"label {label} is outside 0..{task['num_classes'] - 1}")
    return label


LABEL_KINDS = ("key", "count", "bin", "min_bin")

# ------------------------------------------------------------------------------------- images

_MAGIC = ((b"\xff\xd8\xff", "jpg"), (b"\x89PNG\r\n\x1a\n", "png"))


def image_extension(data):
    """File extension from the image's magic bytes: jpg or png."""
    for magic, ext in _MAGIC:
        if bytes(data[:len(magic)]) == magic:
            return ext
    raise ValueError("its image is neither JPEG nor PNG")


def scale_pixels(data, factor):
    """Re-encode a 0/1 grayscale image as PNG with pixels multiplied by `factor` (dSprites)."""
    from PIL import Image  # only dSprites needs it
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except Exception as e:  # noqa: BLE001 - PIL raises many types for broken files
        raise ValueError(f"its image cannot be decoded ({e})") from None
    if image.mode != "L" or image.getextrema()[1] > 1:
        raise ValueError("its image is not a 0/1 grayscale image as expected")
    out = io.BytesIO()
    image.point(lambda v: v * factor).save(out, format="PNG")
    return out.getvalue()


# ------------------------------------------------------------------------------------- TFDS folders

def _version_key(name):
    return tuple(int(p) for p in name.split("."))


def find_version_dir(tfds_dir, task_name, task):
    """The highest TFDS version folder of the task's dataset matching the version VTAB asks for."""
    root = os.path.join(tfds_dir, task["folder"])
    if not os.path.isdir(root):
        raise ValueError(f"TFDS dataset folder {root} not found; prepare {task_name} with TFDS first.")
    want = task["version"]
    versions = [d for d in os.listdir(root) if re.fullmatch(r"\d+\.\d+\.\d+", d)
                and (d == want or (want.endswith(".") and d.startswith(want)))
                and os.path.isdir(os.path.join(root, d))]
    if not versions:
        raise ValueError(f"no folder for TFDS version {want}* under {root}.")
    return os.path.join(root, max(versions, key=_version_key))


def _info_shard_lengths(version_dir):
    """{split: [shard lengths]} from dataset_info.json, or {} when it is absent or has none."""
    path = os.path.join(version_dir, "dataset_info.json")
    if not os.path.exists(path):
        return {}
    try:
        with open(path) as f:
            info = json.load(f)
        return {s["name"]: [int(n) for n in s["shardLengths"]]
                for s in info.get("splits", []) if "shardLengths" in s}
    except (ValueError, KeyError, TypeError, AttributeError):
        raise ValueError(f"{path} is not a readable TFDS dataset_info.json.") from None


def split_shards(version_dir, split):
    """[(shard path, number of records)] of a TFDS split, in shard index order."""
    pattern = re.compile(r".*-" + re.escape(split) + r"\.tfrecord-(\d{5})-of-(\d{5})$")
    found = {}
    for path in glob.glob(os.path.join(glob.escape(version_dir), f"*-{split}.tfrecord-*")):
        m = pattern.match(os.path.basename(path))
        if m:
            found[int(m.group(1))] = (path, int(m.group(2)))
    if not found:
        raise ValueError(f"no '{split}' TFRecord shards in {version_dir}.")
    totals = {total for _, total in found.values()}
    total = totals.pop()
    if totals or sorted(found) != list(range(total)):
        raise ValueError(f"the '{split}' shards in {version_dir} are incomplete: expected {total} "
                         f"numbered 00000 to {total - 1:05d}, found {len(found)}.")
    paths = [found[i][0] for i in range(total)]
    lengths = _info_shard_lengths(version_dir).get(split)
    if lengths is None or len(lengths) != total:
        lengths = [count_records(p) for p in paths]
    return list(zip(paths, lengths))


def resolve_start(start, n):
    """An absolute start index from a TASKS start spec and the TFDS split size n."""
    if start == 0:
        return 0
    if start[0] == "floor":
        return sum(p * n // 100 for p in start[1:])
    if start[0] == "percent":
        if start[1] * n % 100:
            raise ValueError(f"{start[1]}% of {n} examples is not a whole number; TFDS rounding is not "
                             f"reproduced here.")
        return start[1] * n // 100
    raise ValueError(f"unknown slice start {start}")


def read_slice(shards, begin, count):
    """Yield the records [begin, begin + count) of a split (count None: to the end)."""
    offset = 0
    end = None if count is None else begin + count
    for path, length in shards:
        if end is not None and offset >= end:
            return
        if offset + length > begin:
            skip = max(0, begin - offset)
            seen = skip
            for data in iter_records(path, skip=skip):
                if end is not None and offset + seen >= end:
                    return
                seen += 1
                yield data
            if seen != length:
                raise ValueError(f"{path} holds {seen} records, but dataset_info.json says {length}.")
        offset += length


# ------------------------------------------------------------------------------------- conversion

def split_plan(version_dir, task, sizes, test_limit):
    """{split name: (shards, begin, count)} of a task's VTAB-1k splits, with their sizes checked."""
    n_train, n_val = sizes
    plan = {}
    for name, (split, start), count in (("train800", (task["train"], 0), n_train),
                                        ("val200", task["val"], n_val),
                                        ("test", task["test"], test_limit)):
        shards = split_shards(version_dir, split)
        total = sum(n for _, n in shards)
        begin = resolve_start(start, total)
        available = total - begin
        if count is not None and count > available:
            if name != "test":
                raise ValueError(f"{name} needs {count} examples from TFDS split '{split}' at {begin}, "
                                 f"but it has only {available} there.")
            count = available
        plan[name] = (shards, begin, count)
    return plan


def convert_split(name, records, task, images_dir):
    """Write one split's images; returns its list lines `images/<file> <label>`."""
    lines = []
    for index, data in enumerate(records):
        try:
            features = parse_example(data)
            image = _get(features, task["image"], "bytes")
            if len(image) != 1:
                raise ValueError(f"feature '{task['image']}' holds {len(image)} images, not one")
            image = image[0]
            if task.get("scale_pixels"):
                image = scale_pixels(image, task["scale_pixels"])
            ext = image_extension(image)
            label = label_of(features, task)
        except ValueError as e:
            raise ValueError(f"{name} example {index} is invalid: {e}.") from None
        filename = f"{name}_{index}.{ext}"
        with open(os.path.join(images_dir, filename), "wb") as f:
            f.write(image)
        lines.append(f"images/{filename} {label}")
    return lines


def write_list(path, lines):
    """Write a list file atomically (temporary name, then os.replace)."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write("".join(line + "\n" for line in lines))
    os.replace(tmp, path)


def convert_task(task_name, tfds_dir, out_dir, sizes, test_limit, overwrite):
    """Convert one task into <out>/<task> via <out>/<task>.partial."""
    task = TASKS[task_name]
    final = os.path.join(out_dir, task_name)
    if os.path.exists(final) and not overwrite:
        raise ValueError(f"{final} already exists; remove it or pass --overwrite.")
    version_dir = find_version_dir(tfds_dir, task_name, task)
    plan = split_plan(version_dir, task, sizes, test_limit)
    partial = final + ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    os.makedirs(os.path.join(partial, "images"))
    try:
        lists = {}
        for name in SPLIT_NAMES:
            shards, begin, count = plan[name]
            lists[name] = convert_split(name, read_slice(shards, begin, count), task,
                                        os.path.join(partial, "images"))
        lists["train800val200"] = lists["train800"] + lists["val200"]
        for name, lines in lists.items():
            write_list(os.path.join(partial, f"{name}.txt"), lines)
        _replace_dir(partial, final)
    except BaseException as e:
        if not isinstance(e, KeyboardInterrupt):
            shutil.rmtree(partial, ignore_errors=True)
        raise
    return {name: len(lines) for name, lines in lists.items()}


def _replace_dir(src, dst):
    """Move the finished folder into place, replacing an older one."""
    old = dst + ".old"
    if os.path.exists(dst):
        shutil.rmtree(old, ignore_errors=True)
        os.rename(dst, old)
    os.rename(src, dst)
    shutil.rmtree(old, ignore_errors=True)


# ------------------------------------------------------------------------------------- CLI

def parse_sizes(text):
    """'800,200' -> (800, 200)."""
    try:
        sizes = tuple(int(p) for p in text.split(","))
    except ValueError:
        sizes = ()
    if len(sizes) != 2 or min(sizes) < 1:
        raise argparse.ArgumentTypeError("expected two positive integers TRAIN,VAL, e.g. 800,200")
    return sizes


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description="Convert VTAB-1k datasets prepared by TensorFlow Datasets (TFRecord shards) into "
                    "task folders of images and train800/val200/train800val200/test list files, "
                    "without TensorFlow.",
        epilog="Labels follow the VTAB tasks: CLEVR count = objects - 3; CLEVR distance and KITTI distance "
               "= depth bins; dSprites location/orientation = 32/40 values binned into 16 classes (their "
               "0/1 images are scaled to 0/255); smallNORB azimuth/elevation = the TFDS label keys. A "
               "record whose label falls outside these rules stops the conversion with an error.")
    parser.add_argument("--tfds-dir", required=True,
                        help="TFDS data folder holding the prepared datasets, e.g. ~/tensorflow_datasets")
    parser.add_argument("--out", required=True,
                        help="output folder; each task is written to <out>/<task>")
    parser.add_argument("--tasks", nargs="+", choices=list(TASKS), default=list(TASKS), metavar="TASK",
                        help="VTAB-1k tasks to convert (default: all 19): " + " ".join(TASKS))
    parser.add_argument("--test-limit", type=int, default=None, metavar="N",
                        help="keep only the first N test examples (default: the whole test split)")
    parser.add_argument("--split-sizes", type=parse_sizes, default=(800, 200), metavar="TRAIN,VAL",
                        help="examples taken from the VTAB train and val splits (default: 800,200, "
                             "i.e. VTAB-1k; smaller values are for quick checks)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace task folders that already exist under --out")
    args = parser.parse_args(argv)
    if args.test_limit is not None and args.test_limit < 1:
        parser.error("--test-limit must be a positive integer")
    return args


def main(argv=None):
    args = parse_args(argv)
    tfds_dir = os.path.expanduser(args.tfds_dir)
    for task_name in args.tasks:
        try:
            os.makedirs(args.out, exist_ok=True)
            counts = convert_task(task_name, tfds_dir, args.out, args.split_sizes, args.test_limit,
                                  args.overwrite)
        except ValueError as e:
            print(f"error: {task_name}: {e}", file=sys.stderr)
            return 1
        except OSError as e:
            print(f"error: {task_name}: cannot access {e.filename or 'a file'}: {e.strerror or e}.",
                  file=sys.stderr)
            return 1
        print(f"{task_name}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
