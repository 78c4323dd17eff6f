"""The Figshare reader, preprocessing and splits, on files written in the real layout by tests/figshare_files.py."""
import json
import os
import shutil
import warnings

import h5py
import numpy as np
import pytest
import torch

from figshare_files import (
    cjdata_fields, example_image, example_mask, field, header, write_cvind, write_mat, write_slice, write_zip,
)
from lrp_brain import composites
from lrp_brain.data import (
    CLASS_NAMES, MAX_SIDE, DataError, PatientLeakageWarning, SliceDataset, SliceInfo, Split, Transform, check_dataset,
    find_cvind, find_slices, load_split, make_split, natural_key, read_cvind, read_slice, scan, shared_patients,
    summarise_problems,
)


def good_fields(rows=24, columns=32, label=2, pid='MR032322C', **options):
    return cjdata_fields(example_image(rows, columns), example_mask(rows, columns, 5, 7, 6, 9), label, pid, **options)


@pytest.fixture
def folder(tmp_path):
    """A small dataset: 3 patients per class, 2 slices each, files 1..18 in a nested folder (Kaggle layout)."""
    data = tmp_path / 'dataset' / 'data'
    data.mkdir(parents=True)
    number = 0
    for label in (1, 2, 3):
        for patient in range(3):
            for _ in range(2):
                number += 1
                write_slice(data / f'{number}.mat', example_image(20, 20, seed=number),
                            example_mask(20, 20, 4, 4, 5, 5), label, f'P{label}{patient}')
    return tmp_path / 'dataset'


# --- reading ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('side', [512, 256])
def test_reads_figshare_slice_sizes_and_orientation(tmp_path, side):
    image = example_image(side, side)
    mask = example_mask(side, side, 100, 30, 40, 70)
    path = write_slice(tmp_path / '7.mat', image, mask, 3, '100360', border=[[31., 101.], [100., 101.]])
    with h5py.File(path, 'r') as file:  # the writer stores the transpose, as MATLAB does
        np.testing.assert_array_equal(file['cjdata/image'][()], image.T)
    item = read_slice(path)
    np.testing.assert_array_equal(item.image, image)
    assert item.image.dtype == np.int16
    np.testing.assert_array_equal(item.mask, mask)
    assert item.mask.dtype == np.uint8
    assert (item.label, item.class_name, item.patient, item.path) == (2, 'pituitary', '100360', str(path))
    assert item.size == (side, side) and not item.empty_mask
    np.testing.assert_array_equal(item.border, [[31., 101.], [100., 101.]])


def test_non_square_image_is_transposed_back(tmp_path):
    image = example_image(24, 40)
    path = write_mat(tmp_path / '1.mat', cjdata_fields(image, example_mask(24, 40, 2, 30, 5, 6), 1, 'A1'))
    item = read_slice(path)
    assert item.image.shape == (24, 40)
    assert item.image[3, 35] == image[3, 35] and item.mask[3, 33] == 1 and item.mask[33 % 24, 3] == 0


@pytest.mark.parametrize('orientation', ['row', 'column'])
@pytest.mark.parametrize('pid', ['MR032322C', '100360', 'TCGA-02-0006'])
def test_patient_id_from_character_codes(tmp_path, pid, orientation):
    path = write_mat(tmp_path / '1.mat', good_fields(pid=pid, pid_orientation=orientation))
    assert read_slice(path).patient == pid


@pytest.mark.parametrize('mask_class', ['logical', 'uint8'])
def test_mask_as_logical_or_uint8(tmp_path, mask_class):
    path = write_mat(tmp_path / '1.mat', good_fields(mask_class=mask_class))
    assert read_slice(path).mask.sum() == 6 * 9


def test_mask_stored_as_hdf5_bool(tmp_path):
    fields = good_fields()
    fields['tumorMask'] = (fields['tumorMask'][0].astype(bool), {'MATLAB_class': np.bytes_('logical')})
    path = write_mat(tmp_path / '1.mat', fields)
    assert read_slice(path).mask.sum() == 6 * 9


def test_empty_border_is_allowed(tmp_path):
    fields = good_fields()
    fields['tumorBorder'] = (np.array([1, 0], dtype=np.uint64), {'MATLAB_class': np.bytes_('double'),
                                                                  'MATLAB_empty': np.uint8(1)})
    assert read_slice(write_mat(tmp_path / '1.mat', fields)).border.shape == (0, 2)


def test_empty_mask_is_allowed_and_flagged(tmp_path):
    write_slice(tmp_path / '1.mat', example_image(16, 16), np.zeros((16, 16)), 1, 'A')
    write_slice(tmp_path / '2.mat', example_image(16, 16, 1), example_mask(16, 16, 1, 1, 3, 3), 1, 'A')
    assert read_slice(tmp_path / '1.mat').empty_mask
    result = scan(tmp_path, quiet=True)
    assert [info.path for info in result.slices] == [str(tmp_path / '1.mat'), str(tmp_path / '2.mat')]
    assert [(problem.kind, problem.fatal) for problem in result.problems] == [('empty mask', False)]
    assert result.skipped == []


def test_folder_zip_and_natural_order(tmp_path):
    files = tmp_path / 'files'
    files.mkdir()
    for number in (1, 2, 10):
        write_slice(files / f'{number}.mat', example_image(16, 16, number), example_mask(16, 16, 2, 2, 4, 4),
                    number % 3 + 1, f'P{number}')
    dataset = tmp_path / 'figshare'
    (dataset / '.hidden').mkdir(parents=True)
    (dataset / 'README.txt').write_text('not a slice')
    shutil.copy(files / '1.mat', dataset / '.hidden' / '99.mat')
    write_cvind(dataset / 'cvind.mat', [1, 2, 3])
    zip_path = write_zip(dataset / 'brainTumorDataPublic_1-766.zip', {
        '10.mat': files / '10.mat', '2.mat': files / '2.mat', '1.mat': files / '1.mat',
        '__MACOSX/._1.mat': dataset / 'README.txt',
    })
    refs = find_slices(dataset)
    assert refs == [f'{zip_path}::1.mat', f'{zip_path}::2.mat', f'{zip_path}::10.mat']
    for ref, number in zip(refs, (1, 2, 10)):
        from_zip, from_file = read_slice(ref), read_slice(files / f'{number}.mat')
        np.testing.assert_array_equal(from_zip.image, from_file.image)
        assert (from_zip.patient, from_zip.label, from_zip.path) == (f'P{number}', number % 3, ref)
    assert find_slices(files) == [str(files / f'{number}.mat') for number in (1, 2, 10)]
    assert find_slices(zip_path) == refs
    assert find_cvind(dataset) == str(dataset / 'cvind.mat')
    assert find_cvind(zip_path) == str(dataset / 'cvind.mat')


def test_natural_key():
    names = ['10.mat', '2.mat', '1.mat', 'brainTumorDataPublic_767-1532.zip', 'brainTumorDataPublic_1-766.zip']
    assert sorted(names, key=natural_key) == [
        '1.mat', '2.mat', '10.mat', 'brainTumorDataPublic_1-766.zip', 'brainTumorDataPublic_767-1532.zip']


# --- bad input: each gives one DataError naming the file and the field ---------------------------------------------

def _without(name):
    def change(fields):
        del fields[name]
    return change


def _replace(name, stored, matlab_class='double'):
    def change(fields):
        fields[name] = (stored, {'MATLAB_class': np.bytes_(matlab_class)})
    return change


def _empty_dataset(name, shape):
    def change(fields):
        fields[name] = lambda group, key: group.create_dataset(key, shape=shape, dtype=np.int16, chunks=True)
    return change


BAD_FIELDS = {
    'missing image': (_without('image'), "no field 'image'", 'missing field'),
    'missing tumorMask': (_without('tumorMask'), "no field 'tumorMask'", 'missing field'),
    'missing label': (_without('label'), "no field 'label'", 'missing field'),
    'missing PID': (_without('PID'), "no field 'PID'", 'missing field'),
    'image as text': (_replace('image', np.array([[b'abc']])), 'cjdata.image has dtype', 'wrong dtype'),
    'complex image': (_replace('image', np.ones((4, 4), dtype=np.complex64)), 'cjdata.image has dtype',
                      'wrong dtype'),
    'label as text': (_replace('label', np.array([[b'2']])), 'cjdata.label has dtype', 'wrong dtype'),
    'mask as text': (_replace('tumorMask', np.array([[b'1']])), 'cjdata.tumorMask has dtype', 'wrong dtype'),
    '3-D image': (_replace('image', np.zeros((2, 32, 24), np.int16)), 'cjdata.image has 3 dimensions',
                  'wrong shape'),
    'image a vector': (_replace('image', np.zeros((32, 1), np.int16)), 'cjdata.image has shape (1, 32)',
                       'wrong shape'),
    'empty image': (lambda fields: fields.update(image=(np.zeros(2, np.uint64), {
        'MATLAB_class': np.bytes_('int16'), 'MATLAB_empty': np.uint8(1)})), 'cjdata.image is empty', 'wrong shape'),
    'image too large': (_empty_dataset('image', (5000, 8)), 'cjdata.image has shape (8, 5000)', 'wrong shape'),
    'mask shape': (_replace('tumorMask', np.zeros((24, 32), np.uint8)),
                   'cjdata.tumorMask has shape (32, 24) but cjdata.image has (24, 32)', 'mask shape ≠ image'),
    'mask values': (_replace('tumorMask', np.full((32, 24), 2, np.uint8)), 'values other than 0 and 1: [2]',
                    'invalid values'),
    'label 0': (_replace('label', np.zeros((1, 1))), 'cjdata.label is 0; expected 1, 2 or 3',
                'label outside {1, 2, 3}'),
    'label 4': (_replace('label', np.full((1, 1), 4.)), 'cjdata.label is 4;', 'label outside {1, 2, 3}'),
    'label 2.5': (_replace('label', np.full((1, 1), 2.5)), 'cjdata.label is 2.5;', 'label outside {1, 2, 3}'),
    'two labels': (_replace('label', np.ones((2, 1))), 'cjdata.label has 2 values', 'wrong shape'),
    'empty PID': (_replace('PID', np.full((3, 1), 32, np.uint16), 'char'), 'cjdata.PID is empty', 'empty PID'),
    'NaN image': (_replace('image', np.full((32, 24), np.nan)), 'NaN or infinite', 'invalid values'),
    'odd border': (_replace('tumorBorder', np.ones((3, 1))), 'cjdata.tumorBorder has 3 values', 'wrong shape'),
}


@pytest.mark.parametrize('case', BAD_FIELDS)
def test_bad_fields(tmp_path, case):
    change, expected, kind = BAD_FIELDS[case]
    fields = good_fields()
    change(fields)
    path = write_mat(tmp_path / '12.mat', fields)
    with pytest.raises(DataError) as caught:
        read_slice(path)
    assert str(caught.value).startswith(f'{path}: ') and expected in str(caught.value)
    assert caught.value.kind == kind and isinstance(caught.value, ValueError)


def test_missing_cjdata(tmp_path):
    path = write_mat(tmp_path / '1.mat', good_fields(), struct='other')
    with pytest.raises(DataError, match=r"1\.mat: no 'cjdata' struct \(top-level names: \['other'\]\)"):
        read_slice(path)


def _write_bytes(path, data):
    path.write_bytes(data)
    return path


def _v5_mat(path):
    scipy_io = pytest.importorskip('scipy.io')
    scipy_io.savemat(path, {'cjdata': {'image': np.zeros((4, 4), np.int16), 'label': 1.}})
    return path


def _truncated(path):
    whole = write_mat(path, good_fields()).read_bytes()
    return _write_bytes(path, whole[:len(whole) // 2])


def _corrupt(path):
    whole = bytearray(write_mat(path, good_fields()).read_bytes())
    whole[520:600] = b'\xff' * 80  # the superblock's addresses, right after the signature at 512
    return _write_bytes(path, bytes(whole))


def _header_only(path):
    return _write_bytes(path, header())


BAD_FILES = {
    'text file': (lambda path: _write_bytes(path, b'just some text\n'), 'not a MATLAB v7.3 MAT-file',
                  'not a MAT-file'),
    'empty file': (lambda path: _write_bytes(path, b''), 'empty file', 'truncated or corrupt'),
    'MATLAB v5': (_v5_mat, 'a MATLAB v5 (or older) MAT-file, not v7.3 (HDF5)', 'MATLAB v5 MAT-file'),
    'truncated': (_truncated, 'truncated or corrupt HDF5 file', 'truncated or corrupt'),
    'corrupt': (_corrupt, 'truncated or corrupt HDF5 file', 'truncated or corrupt'),
    'header without HDF5': (_header_only, 'header but no HDF5 data', 'truncated or corrupt'),
}


@pytest.mark.parametrize('case', BAD_FILES)
def test_bad_files(tmp_path, case):
    make, expected, kind = BAD_FILES[case]
    path = make(tmp_path / '5.mat')
    with pytest.raises(DataError) as caught:
        read_slice(path)
    assert str(caught.value).startswith(f'{path}: ') and expected in str(caught.value)
    assert caught.value.kind == kind


def test_missing_file_and_zip_member(tmp_path):
    with pytest.raises(DataError, match='no such file'):
        read_slice(tmp_path / 'nothing.mat')
    with pytest.raises(DataError, match='no such file or folder'):
        find_slices(tmp_path / 'nothing')
    zip_path = write_zip(tmp_path / 'a.zip', {'1.mat': write_mat(tmp_path / '1.mat', good_fields())})
    with pytest.raises(DataError, match="the zip has no member '2.mat'"):
        read_slice(f'{zip_path}::2.mat')
    with pytest.raises(DataError, match='no slice files'):
        find_slices(write_zip(tmp_path / 'b.zip', {}))


def test_bad_zips(tmp_path):
    good = write_mat(tmp_path / 'good.mat', good_fields())
    dataset = tmp_path / 'dataset'
    dataset.mkdir()
    write_zip(dataset / 'a.zip', {'1.mat': good, '../escape.mat': good})
    (dataset / 'b.zip').write_bytes(b'PK\x03\x04 not really a zip')
    with pytest.raises(DataError, match=r'a\.zip::\.\./escape\.mat: member name would escape'):
        find_slices(dataset)
    with pytest.warns(UserWarning) as caught:
        assert find_slices(dataset, skip_bad=True) == [f'{dataset / "a.zip"}::1.mat']
    assert ['member name would escape' in str(w.message) for w in caught] == [True, False]
    assert ['b.zip: not a readable zip file' in str(w.message) for w in caught] == [False, True]


def test_duplicate_names_and_contents(tmp_path):
    dataset = tmp_path / 'dataset'
    (dataset / 'a').mkdir(parents=True)
    (dataset / 'b').mkdir()
    write_mat(dataset / 'a' / '1.mat', good_fields())
    shutil.copy(dataset / 'a' / '1.mat', dataset / 'b' / '1.mat')
    with pytest.raises(DataError, match=r'b/1\.mat: duplicate file: same name as .*a/1\.mat'):
        find_slices(dataset)
    with pytest.warns(UserWarning, match='duplicate file'):
        assert find_slices(dataset, skip_bad=True) == [str(dataset / 'a' / '1.mat')]

    os.rename(dataset / 'b' / '1.mat', dataset / 'b' / '2.mat')  # same bytes, another name
    with pytest.raises(DataError, match=r'2\.mat: duplicate file: the same bytes as .*a/1\.mat'):
        scan(dataset, quiet=True)
    result = scan(dataset, skip_bad=True, quiet=True)
    assert [info.path for info in result.slices] == [str(dataset / 'a' / '1.mat')]
    assert [problem.kind for problem in result.skipped] == ['duplicate']


def test_scan_stops_on_first_bad_file_unless_skip_bad(tmp_path):
    for number in (1, 3):
        write_mat(tmp_path / f'{number}.mat', good_fields(label=number))
    (tmp_path / '2.mat').write_text('oops')
    fields = good_fields()
    fields['label'] = field(np.full((1, 1), 9.), 'double')
    write_mat(tmp_path / '10.mat', fields)
    with pytest.raises(DataError, match=r'2\.mat: not a MATLAB'):
        scan(tmp_path, quiet=True)
    result = scan(tmp_path, skip_bad=True, quiet=True)
    assert [info.label for info in result.slices] == [0, 2]
    assert [problem.ref for problem in result.skipped] == [str(tmp_path / '2.mat'), str(tmp_path / '10.mat')]
    assert summarise_problems(result.skipped) == '2 files: 1 not a MAT-file, 1 label outside {1, 2, 3}'


def test_patient_with_two_classes_is_flagged(tmp_path):
    write_mat(tmp_path / '1.mat', good_fields(label=1, pid='X'))
    write_mat(tmp_path / '2.mat', good_fields(label=2, pid='X', rows=20))
    problems = scan(tmp_path, quiet=True).problems
    assert [(problem.ref, problem.fatal) for problem in problems] == [('patient X', False)]
    assert 'glioma, meningioma' in problems[0].reason


# --- preprocessing ------------------------------------------------------------------------------------------------

def test_transform_same_size_is_min_max():
    image = np.arange(64, dtype=np.int16).reshape(8, 8) * 3 - 20
    mask = example_mask(8, 8, 2, 3, 2, 2)
    pixels, mask_out = Transform(size=8)(image, mask)
    assert pixels.shape == (3, 8, 8) and pixels.dtype == torch.float32
    expected = (image - image.min()) / (image.max() - image.min())
    for channel in pixels:
        np.testing.assert_allclose(channel.numpy(), expected, atol=1e-6)
    np.testing.assert_array_equal(mask_out.numpy(), mask)


def test_transform_downscale_by_two():
    # an image whose value is its column: antialiased bilinear halving averages columns 2j-1, 2j, 2j+1, 2j+2 with
    # weights 1, 3, 3, 1 (/8), giving 2j + 0.5 in the interior; min-max divides by 15 first
    image = np.tile(np.arange(16), (16, 1))
    pixels, _ = Transform(size=8)(image)
    np.testing.assert_allclose(pixels[0, 3, 1:7].numpy(), (2 * np.arange(1, 7) + .5) / 15, atol=1e-6)
    # a mask square at 4..11: output pixel j sees inputs 2j-1..2j+2 (weights 1, 3, 3, 1 / 8); j = 2 and 5 get 7/8,
    # j = 1 and 6 get 1/8, so the binarised square is 2..5
    mask = example_mask(16, 16, 4, 4, 8, 8)
    _, mask_out = Transform(size=8)(image, mask)
    np.testing.assert_array_equal(mask_out.numpy(), example_mask(8, 8, 2, 2, 4, 4))


def test_transform_range_constant_image_and_value_range():
    pixels, _ = Transform(size=5)(example_image(23, 17))
    assert pixels.min() >= 0 and pixels.max() <= 1
    constant, mask = Transform(size=4)(np.full((6, 6), 7, np.int16), np.ones((6, 6)))
    assert torch.equal(constant, torch.zeros(3, 4, 4)) and torch.equal(mask, torch.ones(4, 4))
    pixels, _ = Transform(size=2, value_range=(-1, 1))(np.array([[0, 10], [20, 40]]))
    np.testing.assert_allclose(pixels[0].numpy(), [[-1, -.5], [0, 1]])


def test_transform_flips_image_and_mask_together():
    image = np.zeros((8, 8))
    image[:, :2] = 100
    mask = (image > 0).astype(np.uint8)
    transform = Transform(size=8, flips=True)
    generator = torch.Generator().manual_seed(0)
    flipped = []
    for _ in range(20):
        pixels, mask_out = transform(image, mask, generator=generator)
        assert torch.equal(pixels[0] == 1, mask_out == 1)
        flipped.append(bool(mask_out[0, 7]))
    assert 0 < sum(flipped) < 20
    generator.manual_seed(0)
    assert [bool(transform(image, mask, generator=generator)[1][0, 7]) for _ in range(20)] == flipped
    assert all(torch.equal(Transform(size=8)(image, mask)[1], torch.as_tensor(mask, dtype=torch.float32))
               for _ in range(5))


def test_transform_dict_round_trip_and_zbox_bounds():
    transform = Transform(size=64, flips=True)
    stored = json.loads(json.dumps(transform.to_dict()))
    assert stored == {'size': 64, 'value_range': [0., 1.], 'flips': True, 'mean': None, 'std': None}
    assert Transform.from_dict(stored) == transform
    assert composites.zbox_bounds(transform) == (0., 1.) == composites.zbox_bounds(stored)
    normalised = Transform(size=4, mean=(.5, .5, .5), std=(.25, .25, .25))
    low, high = composites.zbox_bounds(normalised.to_dict())
    assert torch.allclose(low, torch.full((1, 3, 1, 1), -2.)) and torch.allclose(high, torch.full((1, 3, 1, 1), 2.))
    pixels, _ = normalised(np.array([[0, 1], [2, 4]]))
    assert pixels.min() == -2 and pixels.max() == 2
    with pytest.raises(DataError, match='unknown keys'):
        Transform.from_dict({**stored, 'interpolation': 'nearest'})
    with pytest.raises(DataError, match='low < high'):
        Transform(value_range=(1, 1))
    with pytest.raises(DataError, match='both mean and std'):
        Transform(mean=(.5,))


def test_slice_dataset(folder):
    refs = find_slices(folder)
    dataset = SliceDataset(refs[:4], Transform(size=12))
    item = dataset[3]
    assert set(item) == {'image', 'mask', 'label', 'patient', 'path', 'index'}
    assert item['image'].shape == (3, 12, 12) and item['mask'].shape == (12, 12)
    assert (item['label'], item['patient'], item['path'], item['index']) == (0, 'P11', refs[3], 3)
    batch = next(iter(torch.utils.data.DataLoader(dataset, batch_size=4)))
    assert batch['image'].shape == (4, 3, 12, 12) and batch['label'].tolist() == [0, 0, 0, 0]
    assert batch['patient'] == ['P10', 'P10', 'P11', 'P11']


# --- splits -------------------------------------------------------------------------------------------------------

def _infos(patients_per_class=(20, 40, 30), seed=0):
    """Synthetic slice infos: patients of each class with 1..12 slices each."""
    rng = np.random.default_rng(seed)
    infos, number = [], 0
    for label, count in enumerate(patients_per_class):
        for patient in range(count):
            for _ in range(rng.integers(1, 13)):
                number += 1
                infos.append(SliceInfo(f'/data/{number}.mat', label, f'{CLASS_NAMES[label]}-{patient}', (512, 512),
                                       False, str(number)))
    return infos


def test_patient_split_is_stratified_and_disjoint():
    infos = _infos()
    split = make_split(infos, seed=3)
    parts = split.parts()
    assert sorted(ref for refs in parts.values() for ref in refs) == sorted(info.path for info in infos)
    assert shared_patients(split, infos) == {}
    for label in range(3):
        total = sum(info.label == label for info in infos)
        for name, fraction in zip(('train', 'val', 'test'), (.7, .15, .15)):
            count = sum(info.label == label and info.path in set(parts[name]) for info in infos)
            assert abs(count / total - fraction) < .05, (label, name, count, total)
    assert make_split(infos, seed=3).parts() == parts
    assert make_split(infos, seed=4).parts() != parts
    assert (split.method, split.seed, split.fractions, split.root) == ('patient', 3, (.7, .15, .15), '/data')


def test_patient_split_small_dataset_puts_every_class_everywhere():
    split = make_split(_infos((3, 3, 3)), seed=0)
    infos = {info.path: info for info in _infos((3, 3, 3))}
    for refs in split.parts().values():
        assert {infos[ref].label for ref in refs} == {0, 1, 2}


def test_random_split_warns_about_leakage():
    infos = _infos()
    with pytest.warns(PatientLeakageWarning, match='patient leakage'):
        split = make_split(infos, 'random', seed=42)
    sizes = [len(refs) for refs in split.parts().values()]
    assert sizes == [round(.7 * len(infos)), round(.15 * len(infos)), len(infos) - sum(sizes[:2])]
    assert shared_patients(split, infos)  # 90 patients of up to 12 slices cannot all stay in one part


def test_cvind_split_follows_folds():
    infos = _infos((4, 4, 4))
    folds = np.arange(len(infos)) % 5 + 1
    split = make_split(infos, 'cvind', seed=0, cvind=folds)
    assert split.folds == {'test': 1, 'val': 2}
    number = {info.path: int(info.digest) for info in infos}
    assert {folds[number[ref] - 1] for ref in split.test} == {1}
    assert {folds[number[ref] - 1] for ref in split.val} == {2}
    assert {folds[number[ref] - 1] for ref in split.train} == {3, 4, 5}
    assert make_split(infos, 'cvind', seed=3, cvind=folds).folds == {'test': 4, 'val': 5}
    with pytest.raises(DataError, match='cvind has only 3 entries'):
        make_split(infos, 'cvind', cvind=[1, 2, 3])
    with pytest.raises(DataError, match="needs the folds"):
        make_split(infos, 'cvind')


def test_split_arguments_are_checked():
    with pytest.raises(DataError, match='fractions'):
        make_split(_infos(), fractions=(.5, .5, .5))
    with pytest.raises(DataError, match="'patient', 'cvind' or 'random'"):
        make_split(_infos(), method='kfold')


def test_split_file_is_portable(tmp_path, folder):
    split = make_split(find_slices(folder), seed=1, root=folder, quiet=True)
    split.save(tmp_path / 'split.json')
    document = json.loads((tmp_path / 'split.json').read_text())
    assert document['train'][0].startswith('data/') and len(document['train']) == len(split.train)
    moved = tmp_path / 'moved'
    shutil.copytree(folder, moved)
    loaded = Split.load(tmp_path / 'split.json', root=moved)
    assert loaded.train == [ref.replace(str(folder), str(moved)) for ref in split.train]
    assert (loaded.method, loaded.seed, loaded.fractions) == ('patient', 1, (.7, .15, .15))
    assert read_slice(loaded.test[0]).patient == read_slice(split.test[0]).patient


def test_split_file_with_zip_members(tmp_path, folder):
    zip_path = write_zip(tmp_path / 'slices.zip', {f'{n}.mat': folder / 'data' / f'{n}.mat' for n in range(1, 19)})
    split = make_split(find_slices(zip_path), seed=0, quiet=True)
    split.save(tmp_path / 'split.json')
    assert json.loads((tmp_path / 'split.json').read_text())['val'][0].startswith('slices.zip::')
    assert Split.load(tmp_path / 'split.json').parts() == split.parts()


@pytest.mark.parametrize('content, message', [
    ('not json', 'cannot read split file'),
    ('{"train": []}', 'not an lrp-brain split file'),
    ('{"format": "lrp-brain split", "root": "/x", "train": [1], "val": [], "test": []}', "field 'train'"),
    ('{"format": "lrp-brain split", "root": "/x", "train": ["1.mat"], "val": ["1.mat"], "test": []}',
     'in more than one part'),
    ('{"format": "lrp-brain split", "root": "/x", "train": [], "val": [], "test": []}', 'malformed field'),
])
def test_bad_split_files(tmp_path, content, message):
    path = tmp_path / 'split.json'
    path.write_text(content)
    with pytest.raises(DataError, match=message) as caught:
        Split.load(path)
    assert str(caught.value).startswith(str(path))


def test_load_split_makes_saves_and_reuses(tmp_path, folder):
    split_file = tmp_path / 'split.json'
    made = load_split(folder, split_file, seed=5, quiet=True)
    assert split_file.exists() and made.seed == 5
    assert shared_patients(made, scan(folder, quiet=True).slices) == {}
    reused = load_split(folder, split_file, seed=6, quiet=True)  # the file wins over the arguments
    assert reused.parts() == made.parts() and reused.seed == 5
    os.remove(made.test[0])
    with pytest.raises(DataError, match='files of the split are not in'):
        load_split(folder, split_file, quiet=True)


def test_load_split_with_cvind(folder):
    write_cvind(folder / 'cvind.mat', [1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 1, 1, 2, 2, 3, 3, 4, 4], orientation='row')
    np.testing.assert_array_equal(read_cvind(find_cvind(folder))[:4], [1, 1, 2, 2])
    split = load_split(folder, method='cvind', seed=0, quiet=True)
    assert [os.path.basename(ref) for ref in split.test] == ['1.mat', '2.mat', '11.mat', '12.mat']
    os.remove(folder / 'cvind.mat')
    with pytest.raises(DataError, match='no cvind.mat found'):
        load_split(folder, method='cvind', quiet=True)


def test_load_split_skip_bad_records_skipped(folder):
    (folder / 'data' / '19.mat').write_bytes(b'garbage')
    with pytest.raises(DataError, match='19.mat'):
        load_split(folder, quiet=True)
    split = load_split(folder, skip_bad=True, quiet=True)
    assert [ref for ref, _ in split.skipped] == [str(folder / 'data' / '19.mat')]
    assert sum(len(refs) for refs in split.parts().values()) == 18


# --- checking a dataset -------------------------------------------------------------------------------------------

def test_check_dataset_report(tmp_path, folder):
    report = check_dataset(folder, split_file=tmp_path / 'split.json', quiet=True)
    assert report.ok and (tmp_path / 'split.json').exists()
    text = report.format()
    assert '18 slices of 9 patients' in text and 'image sizes: 20×20: 18' in text
    assert '1 meningioma       6         3' in text and 'problems: none' in text
    assert 'P10 2, P11 2, P12 2, P20 2' in text and 'train' in text

    (folder / 'data' / '5.mat').write_bytes(b'garbage')
    report = check_dataset(folder, split_file=tmp_path / 'split.json', quiet=True)
    assert not report.ok
    text = report.format()
    assert 'problems: 2 files: 1 not a MAT-file, 1 split' in text
    assert f'{folder / "data" / "5.mat"}: not a MATLAB v7.3 MAT-file' in text


def test_check_dataset_random_split_flags_leakage(folder):
    report = check_dataset(folder, method='random', seed=42, quiet=True)
    leaks = [problem for problem in report.problems if problem.kind == 'patient leakage']
    assert leaks and not any(problem.fatal for problem in leaks) and report.ok


def test_no_warning_leaks_from_patient_split(folder):
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        load_split(folder, quiet=True)


def test_data_command_exit_codes(tmp_path, folder):
    from click.testing import CliRunner

    from lrp_brain.cli import main
    runner = CliRunner()
    result = runner.invoke(main, ['data', str(folder), '--quiet', '--split-file', str(tmp_path / 'split.json')])
    assert result.exit_code == 0, result.output
    assert '18 slices of 9 patients' in result.output and (tmp_path / 'split.json').exists()
    (folder / 'data' / '3.mat').write_bytes(b'MATLAB 5.0 MAT-file, Platform: GLNXA64' + bytes(100))
    result = runner.invoke(main, ['data', str(folder), '--quiet'])
    assert result.exit_code == 1
    assert f'{folder / "data" / "3.mat"}: ' in result.output and 'MATLAB v5' in result.output
    result = runner.invoke(main, ['data', str(folder), '--quiet', '--skip-bad'])
    assert result.exit_code == 0 and '--skip-bad: skipped 1 file: 1 MATLAB v5 MAT-file' in result.output


@pytest.mark.parametrize('size', [0, -3, 2.5, True, MAX_SIDE + 1, 10 ** 6])
def test_transform_size_outside_1_to_max_side_is_refused(size):
    """A size from a checkpoint's metadata is never trusted: 10⁶ would allocate a 10⁶ × 10⁶ image per slice."""
    with pytest.raises(DataError, match=f'transform size must be an integer from 1 to {MAX_SIDE}, got {size!r}'):
        Transform.from_dict({'size': size})
    assert Transform(size=MAX_SIDE).size == MAX_SIDE and Transform(size=1.0).size == 1
