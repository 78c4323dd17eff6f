"""Synthetic phantoms: the Figshare file layout (checked with h5py directly), determinism, class cues, the cache."""
import os

import h5py
import numpy as np
import pytest
from click.testing import CliRunner
from matplotlib.path import Path as Polygon
from scipy import ndimage

from lrp_brain import phantom
from lrp_brain.cli import main
from lrp_brain.data import DataError, check_dataset, read_cvind, read_slice, shared_patients
from lrp_brain.phantom import draw_patient, make_slice, phantom_dataset, write_phantoms


@pytest.fixture(scope='module')
def phantoms(tmp_path_factory):
    folder = tmp_path_factory.mktemp('phantoms')
    write_phantoms(folder, 90, seed=2, sizes=(128, 64), quiet=True)
    return folder


def test_files_have_the_figshare_layout(phantoms):
    with open(phantoms / '1.mat', 'rb') as file:
        header = file.read(512)
    assert header.startswith(b'MATLAB 7.3 MAT-file') and header[124:128] == b'\x00\x02IM'
    with h5py.File(phantoms / '1.mat', 'r') as file:
        assert list(file) == ['cjdata'] and file['cjdata'].attrs['MATLAB_class'] == b'struct'
        struct = file['cjdata']
        assert sorted(struct) == ['PID', 'image', 'label', 'tumorBorder', 'tumorMask']
        classes = {name: struct[name].attrs['MATLAB_class'] for name in struct}
        assert classes == {'PID': b'char', 'image': b'int16', 'label': b'double', 'tumorBorder': b'double',
                           'tumorMask': b'uint8'}
        assert struct['image'].dtype == np.int16 and struct['tumorMask'].dtype == np.uint8
        assert struct['label'].dtype == np.float64 and struct['label'].shape == (1, 1)
        assert struct['label'][0, 0] in (1., 2., 3.)
        pid = struct['PID']
        assert pid.dtype == np.uint16 and pid.shape[1] == 1 and pid.attrs['MATLAB_int_decode'] == 2
        assert ''.join(map(chr, pid[:, 0])) == read_slice(phantoms / '1.mat').patient
        border = struct['tumorBorder']
        assert border.shape[1] == 1 and border.shape[0] % 2 == 0 and border.shape[0] > 8
        assert struct['image'].shape in ((128, 128), (64, 64))
    with h5py.File(phantoms / 'cvind.mat', 'r') as file:
        assert file['cvind'].shape == (1, 90) and file['cvind'].attrs['MATLAB_class'] == b'double'
        assert set(file['cvind'][0]) == {1., 2., 3., 4., 5.}


def test_arrays_are_stored_transposed(tmp_path):
    image = np.arange(12, dtype=np.int16).reshape(3, 4)
    mask = np.zeros((3, 4), np.uint8)
    mask[0, 3] = 1
    phantom.write_slice(tmp_path / '1.mat', image, mask, 1, 'MR1', np.array([[4., 1.], [4.5, 1.5]]))
    with h5py.File(tmp_path / '1.mat', 'r') as file:
        np.testing.assert_array_equal(file['cjdata/image'][()], image.T)
        np.testing.assert_array_equal(file['cjdata/tumorMask'][()], mask.T)
        np.testing.assert_array_equal(file['cjdata/tumorBorder'][()], [[4.], [1.], [4.5], [1.5]])
        assert file['cjdata/label'][0, 0] == 2.
    item = read_slice(tmp_path / '1.mat')
    np.testing.assert_array_equal(item.image, image)
    assert (item.label, item.patient) == (1, 'MR1')


def test_same_seed_same_bytes(tmp_path):
    first = write_phantoms(tmp_path / 'a', 5, seed=7, sizes=(32,), quiet=True)
    second = write_phantoms(tmp_path / 'b', 5, seed=7, sizes=(32,), quiet=True)
    other = write_phantoms(tmp_path / 'c', 5, seed=8, sizes=(32,), quiet=True)
    read = lambda path: open(path, 'rb').read()  # noqa: E731
    assert [read(path) for path in first] == [read(path) for path in second]
    assert read(tmp_path / 'a' / 'cvind.mat') == read(tmp_path / 'b' / 'cvind.mat')
    assert [read(path) for path in first] != [read(path) for path in other]


def test_phantom_set_passes_the_check_with_patient_wise_split(phantoms):
    report = check_dataset(phantoms, quiet=True)
    assert report.ok and report.problems == []
    infos = report.scan.slices
    assert len(infos) == 90
    patients_by_class = {label: {info.patient for info in infos if info.label == label} for label in range(3)}
    assert all(len(patients) >= 3 for patients in patients_by_class.values()), patients_by_class
    assert {info.size for info in infos} == {(128, 128), (64, 64)}
    for patient in {info.patient for info in infos}:
        own = [info for info in infos if info.patient == patient]
        assert len(own) >= phantom.SLICES_PER_PATIENT[0]
        assert len({info.label for info in own}) == 1 and len({info.size for info in own}) == 1
    assert shared_patients(report.split, infos) == {}
    folds = read_cvind(phantoms / 'cvind.mat')
    for patient in {info.patient for info in infos}:
        numbers = [int(os.path.basename(info.path)[:-4]) for info in infos if info.patient == patient]
        assert len({folds[number - 1] for number in numbers}) == 1


def _outline_mask(border, shape):
    """Rasterise the outline (MATLAB 1-based x, y) at the pixel centres."""
    rows, columns = np.mgrid[:shape[0], :shape[1]]
    polygon = Polygon(border - 1)
    return polygon.contains_points(np.stack([columns.ravel(), rows.ravel()], axis=1)).reshape(shape)


def _head(image):
    """The head: pixels above a tenth of the 99th percentile, holes filled."""
    return ndimage.binary_fill_holes(ndimage.binary_opening(image > .1 * np.percentile(image, 99)))


@pytest.mark.parametrize('label', [0, 1, 2])
def test_tumour_mask_border_and_visibility(label):
    rng = np.random.default_rng(label)
    for _ in range(6):
        image, mask, border = make_slice(rng, label, 96)
        assert image.dtype == np.int16 and mask.dtype == np.uint8 and set(np.unique(mask)) == {0, 1}
        assert ndimage.label(mask)[1] == 1
        assert np.array_equal(_outline_mask(border, mask.shape), mask.astype(bool))
        head = _head(image)
        inside = image[mask == 1].mean()
        assert inside > 1.5 * np.median(image[head & (mask == 0)])  # enhancing: brighter than the brain
    for size in (64, 128):
        assert all(make_slice(rng, label, size)[1].sum() >= 8 for _ in range(10))  # visible at 64 px


def test_glioma_is_ring_enhancing():
    rng = np.random.default_rng(5)
    for _ in range(6):
        image, mask, _ = make_slice(rng, 1, 128)
        depth = ndimage.distance_transform_edt(mask)
        core, rim = image[depth >= .7 * depth.max()], image[(depth > 0) & (depth <= 2)]
        assert core.mean() < .5 * rim.mean()


def test_pituitary_sits_low_on_the_midline_and_is_smallest():
    rng = np.random.default_rng(6)
    areas = {label: [] for label in range(3)}
    for label in range(3):
        for _ in range(8):
            image, mask, _ = make_slice(rng, label, 96)
            areas[label].append(mask.sum())
            if label == 2:
                rows, columns = np.nonzero(_head(image))
                top, bottom = rows.min(), rows.max()
                tumour_rows, tumour_columns = np.nonzero(mask)
                assert (tumour_rows.mean() - top) / (bottom - top) > .8
                assert abs(tumour_columns.mean() - columns.mean()) < .25 * (columns.max() - columns.min())
    assert max(areas[2]) < min(areas[0]) and max(areas[2]) < min(areas[1])


def test_tumour_geometry_follows_the_classes():
    rng = np.random.default_rng(0)
    angles = np.linspace(0, 2 * np.pi, 360, endpoint=False)
    for _ in range(50):
        for label in range(3):
            head, tumour = draw_patient(rng, label)
            x = tumour.centre[0] + tumour.outline_radius(angles) * np.cos(angles)
            y = tumour.centre[1] + tumour.outline_radius(angles) * np.sin(angles)
            level = phantom._brain_level(x, y)
            if label == 0:  # extra-axial: reaches through the inner skull, away from the skull base
                assert level.max() > 1 and phantom._brain_level(*tumour.centre) < 1
                assert not (abs(tumour.centre[0]) < .2 and tumour.centre[1] > .5)
            elif label == 1:  # intra-axial, one hemisphere, dark core
                assert level.max() < .8 and (np.sign(x) == np.sign(tumour.centre[0])).all()
                assert tumour.core < tumour.intensity
            else:  # midline, just above the skull base
                assert abs(tumour.centre[0]) <= .03 and .6 < tumour.centre[1] < .85 and level.max() < 1


def test_phantom_dataset_is_cached(tmp_path, monkeypatch):
    monkeypatch.setenv('LRP_BRAIN_CACHE', str(tmp_path / 'cache'))
    folder = phantom_dataset(6, seed=1, sizes=(32,), quiet=True)
    assert folder.startswith(str(tmp_path / 'cache')) and len(os.listdir(folder)) == 7
    stamp = os.path.getmtime(os.path.join(folder, '1.mat'))
    assert phantom_dataset(6, seed=1, sizes=(32,), quiet=True) == folder
    assert os.path.getmtime(os.path.join(folder, '1.mat')) == stamp
    assert os.listdir(tmp_path / 'cache') == [os.path.basename(folder)]  # no temporary folder left


def test_bad_arguments(tmp_path):
    write_phantoms(tmp_path, 3, sizes=(32,), quiet=True)
    with pytest.raises(DataError, match='already holds .mat files'):
        write_phantoms(tmp_path, 3, quiet=True)
    with pytest.raises(DataError, match='positive integer'):
        write_phantoms(tmp_path / 'new', 0)
    with pytest.raises(DataError, match='sizes must be integers from 16'):
        write_phantoms(tmp_path / 'new', 3, sizes=(8,))
    with pytest.raises(DataError, match='holds a glioma, asked for meningioma'):
        make_slice(np.random.default_rng(0), 0, 32, draw_patient(np.random.default_rng(0), 1))


def test_synth_and_data_commands(tmp_path):
    runner = CliRunner()
    result = runner.invoke(main, ['synth', '--out', str(tmp_path / 'set'), '--n', '30', '--seed', '3',
                                  '--sizes', '48,32', '--quiet'])
    assert result.exit_code == 0, result.output
    assert 'wrote 30 slices and cvind.mat' in result.output
    assert sorted(os.listdir(tmp_path / 'set'), key=lambda name: (len(name), name))[:3] == ['1.mat', '2.mat', '3.mat']
    result = runner.invoke(main, ['data', str(tmp_path / 'set'), '--quiet', '--method', 'cvind'])
    assert result.exit_code == 0, result.output
    assert 'dataset' in result.output and '30 slices' in result.output and 'problems: none' in result.output
    assert 'cvind (seed 0, folds' in result.output
    result = runner.invoke(main, ['synth', '--out', str(tmp_path / 'set2'), '--sizes', '64,x'])
    assert result.exit_code == 2 and 'comma-separated integers' in result.output
