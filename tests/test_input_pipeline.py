"""The input pipeline on digits, a generated image folder and a mocked TFDS set."""

import collections
import gzip
import os

import ml_collections
import numpy as np
from PIL import Image
import pytest
import tensorflow_datasets as tfds

from vit_edge import input_pipeline

MEAN_0_STD_1 = dict(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))


def _config(**overrides):
  aug = dict(random_resized_crop=False, crop_scale=(0.08, 1.0),
             crop_ratio=(3 / 4, 4 / 3), hflip=False, randaugment="",
             random_erasing=0.0, mixup_alpha=0.0, cutmix_alpha=0.0, mixup_prob=1.0,
             mixup_switch_prob=0.5, crop_pct=1.0)
  aug.update(overrides.pop("aug", {}))
  config = dict(dataset="digits", data_dir=None, train_split="train",
                eval_split="test", image_size=12, batch_size=8, eval_batch_size=8,
                shuffle_buffer=10_000, seed=0, cache=False, aug=aug)
  config.update(overrides)
  return ml_collections.ConfigDict(config)


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def _image_keys(batches):
  """Each real example's image as bytes: a multiset to compare example sets."""
  keys = collections.Counter()
  for batch in batches:
    mask = batch.get("mask", np.ones(len(batch["label"])))
    for image, real in zip(batch["image"], mask):
      if real:
        keys[image.tobytes()] += 1
  return keys


# ----------------------------------------------------------------------------------
# Digits: splits, preprocessing, determinism, sharding, padding.


def test_digits_info_and_fixed_stratified_split():
  info = input_pipeline.get_info(_config())
  assert (info.name, info.num_classes, info.num_train_examples,
          info.num_eval_examples) == ("digits", 10, 1437, 360)
  assert info.label_names == tuple("0123456789")
  batches = list(input_pipeline.create_eval_iterator(
      _config(), local_batch_size=64, **MEAN_0_STD_1))
  labels = np.concatenate([b["label"][b["mask"] > 0] for b in batches])
  # Stratified: about 36 test examples of every digit.
  assert labels.size == 360 and set(np.bincount(labels)) <= {35, 36, 37}
  again = list(input_pipeline.create_eval_iterator(
      _config(), local_batch_size=64, **MEAN_0_STD_1))
  np.testing.assert_array_equal(labels, np.concatenate([b["label"] for b in again])
                                [np.concatenate([b["mask"] for b in again]) > 0])


def test_digits_become_normalised_rgb_at_image_size():
  batch = next(iter(input_pipeline.create_eval_iterator(
      _config(), local_batch_size=16, mean=(0.5,) * 3, std=(0.25,) * 3)))
  image = batch["image"]
  assert image.shape == (16, 12, 12, 3) and image.dtype == np.float32
  assert batch["label"].dtype == np.int32 and batch["mask"].dtype == np.float32
  np.testing.assert_array_equal(image[..., 0], image[..., 2])  # grey -> RGB
  # (x / 255 - 0.5) / 0.25 spans [-2, 2]; digits have black background, white ink.
  assert image.min() == pytest.approx(-2.0) and image.max() > 1.5


@pytest.mark.parametrize("cache", [False, True])
def test_train_epochs_are_reshuffled_permutations_of_the_split(cache):
  config = _config(train_split="train[:24]", eval_split="train[:24]", cache=cache)
  train = input_pipeline.create_train_iterator(config, local_batch_size=8,
                                               **MEAN_0_STD_1)
  batches = _take(train, 6)
  for batch in batches:
    assert batch["image"].shape == (8, 12, 12, 3) and batch["label"].dtype == np.int32
  # Without augmentation, train and eval preprocess identically (crop_pct=1).
  split = _image_keys(input_pipeline.create_eval_iterator(
      config, local_batch_size=8, **MEAN_0_STD_1))
  assert _image_keys(batches[:3]) == split and _image_keys(batches[3:]) == split
  first_order = [b["image"].tobytes() for b in batches[:3]]
  assert first_order != [b["image"].tobytes() for b in batches[3:]]


def test_resume_yields_the_batches_of_an_uninterrupted_run():
  # 20 examples, batches of 8: step 3 starts 4 examples into the second epoch.
  config = _config(train_split="train[:20]", seed=7, aug=dict(
      random_resized_crop=True, crop_scale=(0.3, 1.0), hflip=True,
      randaugment="rand-m9-mstd0.5-inc1", random_erasing=0.5))
  kwargs = dict(local_batch_size=8, mean=(0.5,) * 3, std=(0.5,) * 3)
  fresh = _take(input_pipeline.create_train_iterator(config, **kwargs), 5)
  resumed = _take(input_pipeline.create_train_iterator(config, start_step=3,
                                                       **kwargs), 2)
  for expected, actual in zip(fresh[3:], resumed):
    np.testing.assert_array_equal(expected["label"], actual["label"])
    np.testing.assert_array_equal(expected["image"], actual["image"])
  # The augmentations are live: a repeated example differs between epochs.
  assert not np.array_equal(fresh[0]["image"], fresh[3]["image"])
  config.seed = 8
  other_seed = _take(input_pipeline.create_train_iterator(config, **kwargs), 1)
  assert not np.array_equal(fresh[0]["image"], other_seed[0]["image"])


def test_processes_read_disjoint_shards_that_cover_the_split():
  config = _config(train_split="train[:20]", eval_split="train[:20]")
  shards = []
  for process_index in range(2):
    train = input_pipeline.create_train_iterator(
        config, local_batch_size=5, process_index=process_index, process_count=2,
        **MEAN_0_STD_1)
    shards.append(_image_keys(_take(train, 2)))  # One epoch of the 10-example shard.
  assert not set(shards[0]) & set(shards[1])
  assert shards[0] + shards[1] == _image_keys(input_pipeline.create_eval_iterator(
      config, local_batch_size=5, **MEAN_0_STD_1))


def test_eval_is_padded_to_the_same_batch_count_on_every_process():
  config = _config(eval_split="test[:11]")  # 6 + 5 examples over 2 processes.
  masks = []
  for process_index in range(2):
    batches = input_pipeline.create_eval_iterator(
        config, local_batch_size=4, process_index=process_index, process_count=2,
        **MEAN_0_STD_1)
    first, second = list(batches), list(batches)  # Each pass starts afresh.
    assert len(batches) == len(first) == 2
    for a, b in zip(first, second):
      np.testing.assert_array_equal(a["image"], b["image"])
    mask = np.concatenate([b["mask"] for b in first])
    padding = np.concatenate([b["image"] for b in first])[mask == 0]
    assert np.all(padding == 0)
    masks.append(mask)
  assert [m.sum() for m in masks] == [6, 5]
  np.testing.assert_array_equal(masks[1], [1, 1, 1, 1, 1, 0, 0, 0])


def test_bad_arguments_are_named():
  with pytest.raises(ValueError, match="'validation'.*Available splits"):
    input_pipeline.get_info(_config(train_split="validation"))
  with pytest.raises(ValueError, match=r"train\[:5000\]"):
    input_pipeline.get_info(_config(train_split="train[:5000]"))
  with pytest.raises(ValueError, match="Unknown config.dataset 'no_such_set'"):
    input_pipeline.get_info(_config(dataset="no_such_set"))
  with pytest.raises(ValueError, match="process_index=2"):
    input_pipeline.create_eval_iterator(_config(), local_batch_size=4,
                                        process_index=2, process_count=2,
                                        **MEAN_0_STD_1)
  with pytest.raises(ValueError, match="RandAugment config 'rand-q9'"):
    input_pipeline.create_train_iterator(_config(aug=dict(randaugment="rand-q9")),
                                         local_batch_size=4, **MEAN_0_STD_1)
  with pytest.raises(ValueError, match=r"crop_scale=\(0.5, 2.0\)"):
    input_pipeline.create_train_iterator(
        _config(aug=dict(random_resized_crop=True, crop_scale=(0.5, 2.0))),
        local_batch_size=4, **MEAN_0_STD_1)
  with pytest.raises(ValueError, match="std=.*positive"):
    input_pipeline.create_train_iterator(_config(), local_batch_size=4,
                                         mean=(0.5,) * 3, std=(0.0,) * 3)


# ----------------------------------------------------------------------------------
# Image folder.


def _write_image_folder(root):
  """Red cats and blue dogs of several sizes, one greyscale, one JPEG; 'bird' only
  in test."""
  colours = {"cat": (200, 30, 30), "dog": (30, 30, 200), "bird": (30, 200, 30)}
  layout = {"train": {"cat": 5, "dog": 4}, "test": {"cat": 2, "dog": 2, "bird": 1}}
  for split, classes in layout.items():
    for name, count in classes.items():
      folder = root / split / name
      folder.mkdir(parents=True)
      for i in range(count):
        pixels = np.full([9 + i, 13 - i, 3], colours[name], np.uint8)
        Image.fromarray(pixels).save(folder / f"{i}.png")
  Image.fromarray(np.full([10, 10], 90, np.uint8)).save(root / "train/cat/grey.png")
  Image.fromarray(np.full([16, 20, 3], colours["cat"], np.uint8)).save(
      root / "train/cat/photo.JPG", quality=95)
  (root / "train" / "cat" / "notes.txt").write_text("not an image")


def _assert_colour_matches_label(images, labels):
  # The dominant colour channel tells the class: bird green, cat red, dog blue.
  colour = images.mean(axis=(1, 2))
  coloured = np.ptp(colour, axis=-1) > 0.1  # Leaves out the grey cat.
  np.testing.assert_array_equal(colour.argmax(-1)[coloured],
                                np.array([1, 0, 2])[labels][coloured])


@pytest.mark.parametrize("cache", [False, True])
def test_imagefolder_reads_splits_classes_and_images(tmp_path, cache):
  _write_image_folder(tmp_path)
  config = _config(dataset="imagefolder", data_dir=str(tmp_path), cache=cache,
                   aug=dict(random_resized_crop=True, hflip=True))
  info = input_pipeline.get_info(config)
  assert info.label_names == ("bird", "cat", "dog") and info.num_classes == 3
  assert (info.num_train_examples, info.num_eval_examples) == (11, 5)
  train = input_pipeline.create_train_iterator(config, local_batch_size=11,
                                               **MEAN_0_STD_1)
  batch = next(train)
  assert batch["image"].shape == (11, 12, 12, 3)
  assert sorted(batch["label"]) == [1] * 7 + [2] * 4  # One epoch, every file once.
  _assert_colour_matches_label(batch["image"], batch["label"])
  batches = list(input_pipeline.create_eval_iterator(config, local_batch_size=4,
                                                     **MEAN_0_STD_1))
  images = np.concatenate([b["image"] for b in batches])[:5]
  labels = np.concatenate([b["label"] for b in batches])[:5]
  assert sorted(labels) == [0, 1, 1, 2, 2]
  _assert_colour_matches_label(images, labels)


def test_imagefolder_errors_say_what_is_wrong(tmp_path):
  with pytest.raises(ValueError, match="needs config.data_dir"):
    input_pipeline.get_info(_config(dataset="imagefolder"))
  missing = tmp_path / "missing"
  with pytest.raises(FileNotFoundError, match=f"{missing}.*does not exist"):
    input_pipeline.get_info(_config(dataset="imagefolder", data_dir=str(missing)))
  (tmp_path / "train").mkdir()
  with pytest.raises(FileNotFoundError, match="no split folder with class"):
    input_pipeline.get_info(_config(dataset="imagefolder", data_dir=str(tmp_path)))
  (tmp_path / "train" / "cat").mkdir()
  with pytest.raises(FileNotFoundError, match="holds no images"):
    input_pipeline.get_info(_config(dataset="imagefolder", data_dir=str(tmp_path)))


# ----------------------------------------------------------------------------------
# TFDS.


def test_mocked_tfds_cifar10(tmp_path, write_tfds_metadata):
  # mock_data serves num_examples for any split, so both splits have that size.
  write_tfds_metadata(tmp_path, "cifar10", {"train": 12, "test": 12})
  config = _config(dataset="cifar10", data_dir=str(tmp_path), aug=dict(
      random_resized_crop=True, hflip=True))
  with tfds.testing.mock_data(num_examples=12, data_dir=str(tmp_path)):
    info = input_pipeline.get_info(config)
    assert (info.num_classes, info.num_train_examples, info.num_eval_examples) == (
        10, 12, 12)
    assert len(info.label_names) == 10
    batches = _take(input_pipeline.create_train_iterator(
        config, local_batch_size=8, **MEAN_0_STD_1), 3)
    assert all(b["image"].shape == (8, 12, 12, 3) for b in batches)
    assert all(0 <= b["image"].min() and b["image"].max() <= 1 for b in batches)
    resumed = _take(input_pipeline.create_train_iterator(
        config, local_batch_size=8, start_step=2, **MEAN_0_STD_1), 1)
    np.testing.assert_array_equal(batches[2]["image"], resumed[0]["image"])
    evals = list(input_pipeline.create_eval_iterator(config, local_batch_size=5,
                                                     **MEAN_0_STD_1))
    assert [b["mask"].sum() for b in evals] == [5, 5, 2]


def test_unprepared_tfds_set_names_the_build_command(tmp_path):
  with pytest.raises(FileNotFoundError) as error:
    input_pipeline.get_info(_config(dataset="cifar10", data_dir=str(tmp_path)))
  message = str(error.value)
  assert "'cifar10'" in message and str(tmp_path) in message
  assert f"tfds build cifar10 --data_dir={tmp_path}" in message
  with pytest.raises(FileNotFoundError) as error:
    input_pipeline.get_info(_config(dataset="imagenet2012", data_dir=str(tmp_path)))
  message = str(error.value)
  assert "manual download" in message and "ILSVRC2012_img_train.tar" in message
  assert f"tfds build imagenet2012 --data_dir={tmp_path} --manual_dir=" in message


# ----------------------------------------------------------------------------------
# Fashion-MNIST (IDX files).


def _write_idx(path, array):
  """An unsigned-byte IDX file; gzipped when the name ends in .gz."""
  header = bytes([0, 0, 8, array.ndim]) + np.asarray(array.shape, ">u4").tobytes()
  opener = gzip.open if str(path).endswith(".gz") else open
  with opener(path, "wb") as f:
    f.write(header + array.astype(np.uint8).tobytes())


def _write_tiny_fashion(root, num_train=12, num_test=5):
  """Images whose every pixel is 20 * label + split offset: labels are readable."""
  for prefix, n, gz, offset in (("train", num_train, ".gz", 0),
                                ("t10k", num_test, "", 5)):
    labels = np.arange(n) % 10
    images = np.broadcast_to((20 * labels + offset)[:, None, None], (n, 28, 28))
    _write_idx(root / f"{prefix}-images-idx3-ubyte{gz}", images)
    _write_idx(root / f"{prefix}-labels-idx1-ubyte{gz}", labels)


@pytest.mark.parametrize("cache", [False, True])
def test_fashion_mnist_reads_idx_files_through_the_pipeline(tmp_path, cache):
  _write_tiny_fashion(tmp_path)  # train gzipped, test plain.
  config = _config(dataset="fashion_mnist", data_dir=str(tmp_path), image_size=28,
                   train_split="train[:50%]", cache=cache, aug=dict(hflip=True))
  info = input_pipeline.get_info(config)
  assert (info.num_classes, info.num_train_examples, info.num_eval_examples) == (
      10, 6, 5)
  assert info.label_names[0] == "T-shirt/top" and info.label_names[9] == "Ankle boot"
  train = input_pipeline.create_train_iterator(config, local_batch_size=3,
                                               **MEAN_0_STD_1)
  batches = _take(train, 4)  # Two epochs of the 6 examples.
  for batch in batches:
    assert batch["image"].shape == (3, 28, 28, 3)
    np.testing.assert_allclose(batch["image"], np.broadcast_to(
        (20 * batch["label"] / 255.0)[:, None, None, None], (3, 28, 28, 3)),
                               atol=1e-6)
  assert sorted(np.concatenate([b["label"] for b in batches[:2]])) == list(range(6))
  resumed = _take(input_pipeline.create_train_iterator(
      config, local_batch_size=3, start_step=3, **MEAN_0_STD_1), 1)
  np.testing.assert_array_equal(batches[3]["label"], resumed[0]["label"])
  evals = list(input_pipeline.create_eval_iterator(config, local_batch_size=4,
                                                   **MEAN_0_STD_1))
  labels = np.concatenate([b["label"] for b in evals])[:5]
  np.testing.assert_array_equal(labels, np.arange(5))
  images = np.concatenate([b["image"] for b in evals])[:5]
  np.testing.assert_allclose(images[:, 0, 0, 0], (20 * labels + 5) / 255.0, atol=1e-6)


def test_fashion_mnist_errors_name_the_file_and_the_fix(tmp_path):
  config = _config(dataset="fashion_mnist", data_dir=str(tmp_path))
  with pytest.raises(FileNotFoundError) as error:
    input_pipeline.get_info(config)
  message = str(error.value)
  assert str(tmp_path / "train-images-idx3-ubyte") in message
  assert "sudo apt-get install dataset-fashion-mnist" in message
  assert "--config.data_dir" in message and "tfds:fashion_mnist" in message
  (tmp_path / "wrong").mkdir()
  _write_tiny_fashion(tmp_path / "wrong")
  # Labels where images belong: the magic number names the file.
  labels = tmp_path / "wrong" / "t10k-labels-idx1-ubyte"
  (tmp_path / "wrong" / "t10k-images-idx3-ubyte").write_bytes(labels.read_bytes())
  with pytest.raises(ValueError, match=r"t10k-images-idx3-ubyte is not an unsigned-"
                     r"byte IDX file with 3 dimension\(s\)"):
    input_pipeline.get_info(_config(dataset="fashion_mnist",
                                    data_dir=str(tmp_path / "wrong")))
  # "tfds:" picks TFDS's copy of the same name, which is not prepared here.
  with pytest.raises(FileNotFoundError, match="tfds build fashion_mnist"):
    input_pipeline.get_info(_config(dataset="tfds:fashion_mnist",
                                    data_dir=str(tmp_path)))


def test_fashion_mnist_installed_package():
  # CI installs Debian's dataset-fashion-mnist (.ci/run): no skip.
  config = _config(dataset="fashion_mnist", eval_split="test[:16]")
  info = input_pipeline.get_info(config)
  assert (info.num_train_examples, info.num_eval_examples) == (60_000, 16)
  train_x, train_y = input_pipeline.fashion_mnist_arrays()["train"]
  assert train_x.shape == (60_000, 28, 28, 1) and train_x.dtype == np.uint8
  assert np.bincount(train_y).tolist() == [6000] * 10
  batch = next(iter(input_pipeline.create_eval_iterator(config, local_batch_size=16,
                                                        **MEAN_0_STD_1)))
  assert batch["label"][0] == 9  # The first test image is an ankle boot.
  assert batch["image"].shape == (16, 12, 12, 3) and batch["image"].max() > 0.5


# ----------------------------------------------------------------------------------
# Image folder: undecodable files and empty class folders (config.bad_images).


def _write_bad_images(root):
  """Breaks the folder of _write_image_folder in each way TensorFlow would fail."""
  png = (root / "train/cat/0.png").read_bytes()
  jpeg = (root / "train/cat/photo.JPG").read_bytes()
  (root / "train/cat/cut.png").write_bytes(png[:len(png) // 2])
  (root / "train/dog/cut.jpg").write_bytes(jpeg[:len(jpeg) - 10])
  (root / "test/dog/text.jpg").write_bytes(b"not an image at all")
  (root / "train/dog/empty.png").write_bytes(b"")
  Image.fromarray(np.zeros([4, 4, 3], np.uint8)).save(root / "train/dog/tiff.png",
                                                      format="TIFF")
  return {"train/cat/cut.png", "train/dog/cut.jpg", "test/dog/text.jpg",
          "train/dog/empty.png", "train/dog/tiff.png"}


def test_imagefolder_bad_images_stop_with_their_names(tmp_path):
  _write_image_folder(tmp_path)
  _write_bad_images(tmp_path)
  config = _config(dataset="imagefolder", data_dir=str(tmp_path))
  with pytest.raises(ValueError) as e:
    input_pipeline.get_info(config)
  message = str(e.value)
  assert "\n" not in message
  assert message.startswith(f"5 of 21 image files under {tmp_path} cannot be decoded")
  assert f"{tmp_path}/test/dog/text.jpg (UnidentifiedImageError" in message
  assert "and 2 more" in message and "--config.bad_images=skip" in message


def test_imagefolder_bad_images_skipped_with_a_warning(tmp_path, caplog):
  _write_image_folder(tmp_path)
  _write_bad_images(tmp_path)
  config = _config(dataset="imagefolder", data_dir=str(tmp_path), bad_images="skip")
  with caplog.at_level("WARNING"):
    info = input_pipeline.get_info(config)
    input_pipeline.get_info(config)  # Checked and reported once.
  assert (info.num_train_examples, info.num_eval_examples) == (11, 5)
  warnings = [r.getMessage() for r in caplog.records if "Skipping" in r.getMessage()]
  assert len(warnings) == 1 and "Skipping 5 of 21 image files" in warnings[0]
  batch = next(input_pipeline.create_train_iterator(config, local_batch_size=11,
                                                    **MEAN_0_STD_1))
  assert sorted(batch["label"]) == [1] * 7 + [2] * 4


def test_imagefolder_jpeg_with_padding_after_its_end_is_fine(tmp_path):
  _write_image_folder(tmp_path)
  photo = tmp_path / "train/cat/photo.JPG"
  photo.write_bytes(photo.read_bytes() + b"\0" * 100)
  config = _config(dataset="imagefolder", data_dir=str(tmp_path))
  assert input_pipeline.get_info(config).num_train_examples == 11


def test_imagefolder_empty_class_folder(tmp_path, caplog):
  _write_image_folder(tmp_path)
  (tmp_path / "train" / "fox").mkdir()
  (tmp_path / "test" / "fox").mkdir()
  (tmp_path / "test" / "fox" / "readme.txt").write_text("no images here")
  config = _config(dataset="imagefolder", data_dir=str(tmp_path))
  with pytest.raises(FileNotFoundError,
                     match=rf"2 empty class folder\(s\) under {tmp_path} .*"
                           rf"{tmp_path}/test/fox, {tmp_path}/train/fox\. .*bad_images=skip"):
    input_pipeline.get_info(config)
  with caplog.at_level("WARNING"):
    info = input_pipeline.get_info(_config(dataset="imagefolder",
                                           data_dir=str(tmp_path), bad_images="skip"))
  assert info.label_names == ("bird", "cat", "dog")  # fox is not a class.
  assert any("leaving them out" in r.getMessage() for r in caplog.records)


def test_imagefolder_bad_images_mode_is_checked(tmp_path):
  _write_image_folder(tmp_path)
  with pytest.raises(ValueError, match=r"config.bad_images='ignore'; expected one of"):
    input_pipeline.get_info(_config(dataset="imagefolder", data_dir=str(tmp_path),
                                    bad_images="ignore"))


def test_every_config_has_a_fashion_variant_that_combines_with_others():
  import glob  # pylint: disable=g-import-not-at-top
  import importlib.util  # pylint: disable=g-import-not-at-top
  configs = os.path.join(os.path.dirname(__file__), "..", "configs", "*.py")
  paths = sorted(glob.glob(configs))
  assert len(paths) >= 21
  for path in paths:
    spec = importlib.util.spec_from_file_location("config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config("fashion,bf16")
    assert (config.dataset, config.dtype, config.aug.hflip) == (
        "fashion_mnist", "bfloat16", True), path
    assert module.get_config().dataset == "digits", path  # The default is unchanged.
  with pytest.raises(ValueError, match="each choose a data set"):
    module.get_config("fashion,imagenet")
