"""DICOM input, written here with pydicom from real ISBI 2015 cephalograms: every encoding the units export gives the
same grey pixels, and so the same predicted points, as those pixels given as PNG; the spacing comes from the header
unless a pixel-size table overrides it; files that are no radiograph are named."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import cli
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import JPEGLSLossless, RLELossless, generate_uid

from tune_landmarks.cache import decode_image
from tune_landmarks.predict import predict
from tune_landmarks.read import describe, load_split

DX = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation


def dicom(path: Path, stored: np.ndarray, photometric: str = "MONOCHROME2", rle: bool = False,
          preamble: bool = True, **tags) -> Path:
    """A single-frame radiograph as a unit would export it: `stored` values, any further header `tags`."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = tags.pop("SOPClassUID", DX), generate_uid()
    meta.TransferSyntaxUID = "1.2.840.10008.1.2.1"  # explicit VR little endian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID, "DX"
    bits = stored.dtype.itemsize * 8
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits, bits - 1, 0
    ds.PixelData = stored.tobytes()
    for k, v in tags.items():
        setattr(ds, k, v)
    if rle:
        ds.compress(RLELossless, stored)
    ds.save_as(path, enforce_file_format=preamble)
    return path


@pytest.fixture(scope="module")
def film(isbi_root) -> np.ndarray:
    """A real cephalogram (ISBI 151, half size) whose grey values span 0..255: with no window in the file, the full
    range of the values present maps onto 0..255, so these pixels come back exactly."""
    img = cv2.resize(cv2.imread(str(isbi_root / "images" / "151.jpg"), cv2.IMREAD_GRAYSCALE), (968, 1200),
                     interpolation=cv2.INTER_AREA)
    img[0, 0], img[0, 1] = 0, 255
    return img


@pytest.fixture(scope="module")
def encodings(film, tmp_path_factory) -> dict[str, Path]:
    """The same pixels as PNG and as DICOM in each way a unit may store them, each with 0.1 mm pixels."""
    d = tmp_path_factory.mktemp("dicom")
    cv2.imwrite(str(d / "png.png"), film)
    wide = film.astype(np.uint16) * 257
    return {
        "png": d / "png.png",
        "8-bit": dicom(d / "u8.dcm", film, PixelSpacing=[0.1, 0.1]),
        "16-bit, modality LUT": dicom(d / "u16.dcm", wide, RescaleSlope=1, RescaleIntercept=-1024,
                                      ImagerPixelSpacing=[0.11, 0.11], EstimatedRadiographicMagnificationFactor=1.1),
        "MONOCHROME1": dicom(d / "mono1.dcm", 255 - film, "MONOCHROME1", ImagerPixelSpacing=[0.1, 0.1]),
        # the linear window of PS3.3 C.11.2.1.2 that maps 0..65535 onto 0..1 exactly
        "RLE, 16-bit, window": dicom(d / "rle.dcm", wide, rle=True, WindowCenter=32768, WindowWidth=65536,
                                     PixelSpacing=[0.1, 0.1]),
        "no suffix": dicom(d / "film_nosuffix", film, PixelSpacing=[0.1, 0.1]),
    }


def test_every_encoding_decodes_to_the_same_pixels(film, encodings):
    assert np.array_equal(decode_image(encodings["png"]), film)
    for name, path in encodings.items():
        assert np.array_equal(decode_image(path), film), name


def test_window_and_voi_lut_are_applied(film, tmp_path):
    """Values outside the first window clip to black and white; a VOI LUT, when the file has one, is used instead."""
    from pydicom.dataset import Dataset as Item

    wide = film.astype(np.uint16) * 257
    got = decode_image(dicom(tmp_path / "w.dcm", wide, WindowCenter=[20000, 40000], WindowWidth=[10000, 10000]))
    lo, hi = 20000 - 0.5 - 9999 / 2, 20000 - 0.5 + 9999 / 2
    assert (got[wide <= lo] == 0).all() and (got[wide > hi] == 255).all()
    inside = (wide > lo) & (wide <= hi)
    expect = np.rint(((wide[inside] - 19999.5) / 9999 + 0.5) * 255)
    assert np.abs(got[inside].astype(int) - expect).max() <= 1
    lut = Item()
    lut.LUTDescriptor = [256, 0, 8]  # an inverting table over 0..255
    lut.add_new((0x0028, 0x3006), "US", list(range(255, -1, -1)))  # LUTData
    got = decode_image(dicom(tmp_path / "lut.dcm", film, VOILUTSequence=[lut], WindowCenter=1, WindowWidth=1))
    assert np.array_equal(got, 255 - film)


def test_predict_reads_dicom_as_png_and_records_the_spacing(isbi_model, encodings, tmp_path):
    """The plain model: the same points (1e-6 px) from every encoding, one folder holding them all (the suffix-less
    file found by its preamble); each JSON records the spacing and where it came from."""
    folder = tmp_path / "in"
    folder.mkdir()
    for path in encodings.values():
        shutil.copy(path, folder / path.name)
    rep = predict(isbi_model, [folder], tmp_path / "out")
    assert not rep.failed and len(rep.predicted) == len(encodings)
    points = {p.path.name: p.points for p in rep.predicted}
    for name, path in encodings.items():
        np.testing.assert_allclose(points[path.name], points["png.png"], atol=1e-6, err_msg=name)
    sources = {name: json.loads((tmp_path / "out" / f"{path.stem}.json").read_text()) for name, path in encodings.items()}
    assert sources["png"]["pixel_size_mm"] is None and sources["png"]["pixel_size_source"] is None
    assert sources["8-bit"]["pixel_size_source"] == "dicom:PixelSpacing"
    assert sources["MONOCHROME1"]["pixel_size_source"] == "dicom:ImagerPixelSpacing"
    assert sources["16-bit, modality LUT"]["pixel_size_mm"] == pytest.approx(0.1)  # 0.11 mm at the detector / 1.1
    assert all(s["pixel_size_mm"] == pytest.approx(0.1) for n, s in sources.items() if n != "png")


@pytest.mark.slow
def test_a_cascade_crops_at_each_files_own_spacing_and_the_table_wins(isbi_refine, film, encodings, tmp_path):
    """A refinement cascade crops in mm: a DICOM file predicts as the PNG given --pixel-size of its header's spacing;
    a --pixel-size-csv row beats the header; and the spacing changes the refined points, so it was used."""
    coarse = dicom(tmp_path / "coarse.dcm", film, PixelSpacing=[0.2, 0.2])
    fine = encodings["8-bit"]
    as_png = {mm: predict(isbi_refine, [encodings["png"]], tmp_path / f"png{mm}", pixel_size=mm).predicted[0].points
              for mm in (0.1, 0.2)}
    # one image a batch, as above: a batch's size changes CPU convolutions' summation order (1e-3 px here)
    got = {p.path.name: p for p in predict(isbi_refine, [fine, coarse], tmp_path / "dcm", batch_size=1).predicted}
    np.testing.assert_allclose(got[fine.name].points, as_png[0.1], atol=1e-6)
    np.testing.assert_allclose(got[coarse.name].points, as_png[0.2], atol=1e-6)
    assert not np.allclose(as_png[0.1], as_png[0.2])
    table = tmp_path / "sizes.csv"
    table.write_text("cephalogram_id,pixel_size\ncoarse,0.1\n", encoding="utf-8")
    p = cli("predict", "--model", isbi_refine, "--out", tmp_path / "csv", coarse, "--pixel-size-csv", table,
            "--pixel-size", "0.3")
    assert p.returncode == 0, p.stderr
    ann = json.loads((tmp_path / "csv" / "coarse.json").read_text())
    assert (ann["pixel_size_mm"], ann["pixel_size_source"]) == (0.1, "csv")
    pts = np.array([[lm["value"]["x"], lm["value"]["y"]] for lm in ann["landmarks"]])
    np.testing.assert_allclose(pts, as_png[0.1], atol=1e-3)  # the JSON rounds to 0.001 px


def test_files_that_are_no_radiograph_are_named(isbi_model, film, tmp_path):
    bad = {
        "no pixel data": dicom(tmp_path / "nopix.dcm", film),
        "non-square": dicom(tmp_path / "rect.dcm", film, PixelSpacing=[0.1, 0.12]),
        "zero spacing": dicom(tmp_path / "zero.dcm", film, ImagerPixelSpacing=[0, 0]),
        "multi-frame": dicom(tmp_path / "frames.dcm", np.concatenate([film, film]), NumberOfFrames=2, Rows=1200),
        "not an image": dicom(tmp_path / "pdf.dcm", film, SOPClassUID="1.2.840.10008.5.1.4.1.1.104.1"),
        "JPEG-LS, no plug-in": tmp_path / "jls.dcm",
        "not DICOM": tmp_path / "text.dcm",
    }
    from pydicom import dcmread

    ds = dcmread(bad["no pixel data"])
    del ds.PixelData
    ds.save_as(bad["no pixel data"])
    ds = dcmread(dicom(bad["JPEG-LS, no plug-in"], film))
    ds.file_meta.TransferSyntaxUID = JPEGLSLossless
    ds.PixelData = encapsulate([b"\xff\xd8\xff\xf7 not really JPEG-LS \xff\xd9"])
    ds.save_as(bad["JPEG-LS, no plug-in"])
    bad["not DICOM"].write_text("hello")
    rep = predict(isbi_model, list(bad.values()), tmp_path / "out")
    assert not rep.predicted
    why = dict(rep.failed)
    expected = {
        "no pixel data": "has no pixel data",
        "non-square": "PixelSpacing is 0.1 x 0.12 mm: non-square pixels are not supported",
        "zero spacing": "ImagerPixelSpacing is 0 x 0 mm, but must be > 0",
        "multi-frame": "is a multi-frame image (2 frames): one radiograph per file is expected",
        "not an image": "its SOP class is Encapsulated PDF Storage, not an image",
        "JPEG-LS, no plug-in": "compressed as JPEG-LS Lossless Image Compression, which needs a decoder plug-in: pip install",
        "not DICOM": "not a readable DICOM file",
    }
    for name, fragment in expected.items():
        assert fragment in why[str(bad[name])], f"{name}: {why[str(bad[name])]}"
    assert not any((tmp_path / "out").glob("*.json"))


def test_aariz_layout_with_dicom_films(copy_synth):
    """Aariz's `Cephalograms/<id>.dcm`: the pixel-size table's row wins, the header fills an image it does not list,
    and `check-dataset` decodes every film; an image with neither is one problem naming it."""
    info = describe(copy_synth)
    split = load_split(info, "valid")
    images = [r.image_path for r in split.records]
    for path in images:
        dicom(path.with_suffix(".dcm"), decode_image(path), PixelSpacing=[0.25, 0.25], Manufacturer="Unit",
              ManufacturerModelName="X1")
        path.unlink()
    table = copy_synth / "cephalogram_machine_mappings.csv"
    lines = table.read_text(encoding="utf-8-sig").splitlines()
    unlisted = images[0].stem
    table.write_text("\n".join(ln for ln in lines if not ln.startswith(unlisted)) + "\n", encoding="utf-8-sig")
    records = {r.image_id: r for r in load_split(describe(copy_synth), "valid").records}
    assert set(records) == {p.stem for p in images}
    assert records[unlisted].spacing_mm == 0.25 and records[unlisted].machine == "Unit X1"
    listed = next(r for i, r in records.items() if i != unlisted)
    assert listed.spacing_mm == {r.image_id: r for r in split.records}[listed.image_id].spacing_mm != 0.25
    assert all(r.image_path.suffix == ".dcm" for r in records.values())
    p = cli("check-dataset", copy_synth, "--no-progress")
    assert p.returncode == 0, p.stdout + p.stderr
    dicom(images[1].with_suffix(".dcm"), decode_image(images[1].with_suffix(".dcm")))  # no spacing in its header
    table.write_text("\n".join(ln for ln in lines if not ln.startswith((unlisted, images[1].stem))) + "\n",
                     encoding="utf-8-sig")
    p = cli("check-dataset", copy_synth, "--no-progress")
    assert p.returncode == 1
    assert f"{images[1].with_suffix('.dcm')}: no pixel_size row for {images[1].stem!r}" in p.stdout
