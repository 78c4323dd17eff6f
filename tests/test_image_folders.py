"""Image folders (one subfolder per class, optional masks and patients CSV) behind the interface of the Figshare
reader: reading, splitting, the dataset report, and every command on them."""
import json
import struct
import warnings
import zlib

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from command_setup import read_csv
from lrp_brain.cli import main
from lrp_brain.data import (
    CLASS_NAMES, DataError, FigshareDataset, ImageFolder, PatientLeakageWarning, SliceDataset, Transform,
    check_dataset, load_split, open_dataset, scan,
)
from lrp_brain.evaluate import evaluate
from lrp_brain.model import default_meta, load_checkpoint, save_checkpoint, vgg16_small
from lrp_brain.phantom import write_phantoms
from lrp_brain.sources import open_source

#: The classes of the test folders, in the order their sorted folder names give.
CLASSES = ('glioma', 'meningioma', 'notumor')


def grey(seed, shape=(12, 16)):
    """A grey 8-bit image with values 10 .. 200 (so min–max and /255 scaling differ)."""
    return np.random.default_rng(seed).integers(10, 201, size=shape, dtype=np.uint8)


def square_mask(shape=(12, 16), top=3, left=4, side=5):
    mask = np.zeros(shape, dtype=np.uint8)
    mask[top:top + side, left:left + side] = 255
    return mask


def write_folder(root, per_class=4, masks=True, patients=True, top=''):
    """Write ``per_class`` 12×16 PNG images per class of :data:`CLASSES` under ``root/top``, with masks of the
    images' relative names (the last image of each class has none) and a patients CSV (two images per patient).
    Return ``{relative name: (pixels, mask or None, patient)}``."""
    written, rows = {}, ['file,patient']
    for label, name in enumerate(CLASSES):
        (root / top / name).mkdir(parents=True, exist_ok=True)
        for index in range(per_class):
            relative = f'{top}{name}/{index:03d}.png'
            pixels = grey(10 * label + index)
            Image.fromarray(pixels).save(root / relative)
            mask = None
            if masks and index < per_class - 1:
                mask = square_mask(top=index, left=label)
                (root / 'masks' / top / name).mkdir(parents=True, exist_ok=True)
                Image.fromarray(mask).save(root / 'masks' / top / name / f'{index:03d}.png')
            patient = f'P{label}{index // 2}'
            rows.append(f'{relative},{patient}')
            written[relative] = (pixels, mask, patient)
    if patients:
        (root / 'patients.csv').write_text('\n'.join(rows) + '\n')
    return written


def png_header(path, width, height):
    """A PNG file that declares ``width``×``height`` 8-bit grey pixels but holds only one row of them."""
    def chunk(kind, data):
        return struct.pack('>I', len(data)) + kind + data + struct.pack('>I', zlib.crc32(kind + data))
    header = struct.pack('>IIBBBBB', width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', header) + chunk(b'IDAT', zlib.compress(b'\x00' * 64))
                     + chunk(b'IEND', b''))
    return path


def write_checkpoint(path, class_names=CLASSES, size=32, **transform):
    torch.manual_seed(0)
    meta = {**default_meta('vgg16', 4), 'class_names': list(class_names),
            'transform': Transform(size=size, **transform).to_dict(), 'input_size': size}
    save_checkpoint(path, vgg16_small(width=4), meta)
    return str(path)


# --- reading ------------------------------------------------------------------------------------------------------

def test_folder_gives_classes_masks_and_patients_as_written(tmp_path):
    written = write_folder(tmp_path)
    (tmp_path / 'notes.txt').write_text('not an image: ignored')
    dataset = open_dataset(tmp_path)
    assert isinstance(dataset, ImageFolder) and dataset.class_names == CLASSES
    assert dataset.has_masks and dataset.has_patients
    refs, problems = dataset.list_files()
    assert problems == [] and len(refs) == len(written) == 12
    for ref in refs:
        item = dataset.read(ref)
        relative = ref[len(str(tmp_path)) + 1:].replace('\\', '/')
        pixels, mask, patient = written[relative]
        assert item.class_name == relative.split('/')[0] and item.label == CLASSES.index(item.class_name)
        np.testing.assert_array_equal(item.image, pixels)
        assert item.full_scale == 255 and item.patient == patient and item.path == ref
        if mask is None:
            assert item.mask is None and not item.has_mask and not item.empty_mask
        else:
            np.testing.assert_array_equal(item.mask, mask // 255)
    assert isinstance(open_dataset(write_phantoms(tmp_path / 'phantoms', 3, quiet=True)[0]), FigshareDataset)


def test_every_image_kind_is_read_as_its_grey_values(tmp_path):
    """16-bit, RGBA, palette and EXIF-rotated images in a class folder, against values computed here."""
    folder = tmp_path / 'data' / 'tumour'
    folder.mkdir(parents=True)
    deep = (np.arange(12 * 16, dtype=np.uint16).reshape(12, 16) * 300)
    Image.fromarray(deep).save(folder / 'deep.png')
    rgba = np.random.default_rng(1).integers(0, 256, size=(12, 16, 4), dtype=np.uint8)
    Image.fromarray(rgba, 'RGBA').save(folder / 'rgba.png')
    indices = np.random.default_rng(2).integers(0, 3, size=(12, 16), dtype=np.uint8)
    palette = Image.fromarray(indices, 'P')
    colours = [[30, 60, 90], [200, 10, 0], [255, 255, 255]]
    palette.putpalette([value for colour in colours for value in colour])
    palette.save(folder / 'palette.png')
    upright = grey(3, (6, 10))
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: a viewer turns it 90° clockwise
    Image.fromarray(np.rot90(upright, 1).copy()).save(folder / 'rotated.png', exif=exif)
    dataset = open_dataset(tmp_path / 'data')
    assert dataset.class_names == ('tumour',) and not dataset.has_masks and not dataset.has_patients
    items = {ref.rsplit('/', 1)[-1]: dataset.read(ref) for ref in dataset.list_files()[0]}
    np.testing.assert_array_equal(items['deep.png'].image, deep)
    assert items['deep.png'].full_scale == 65535
    np.testing.assert_allclose(items['rgba.png'].image, rgba[..., :3].mean(axis=-1))
    np.testing.assert_allclose(items['palette.png'].image, np.array(colours).mean(axis=1)[indices])
    np.testing.assert_array_equal(items['rotated.png'].image, upright)
    assert items['rotated.png'].patient == 'tumour/rotated.png'  # no CSV: every image is its own patient


def test_training_and_testing_folders_are_pooled_by_class(tmp_path):
    write_folder(tmp_path, per_class=2, top='Training/', patients=False)
    write_folder(tmp_path, per_class=2, top='Testing/', patients=False)
    dataset = open_dataset(tmp_path)
    assert dataset.class_names == CLASSES and len(dataset.list_files()[0]) == 12
    item = dataset.read(tmp_path / 'Testing' / 'notumor' / '000.png')
    assert item.class_name == 'notumor' and item.mask is not None  # masks/Testing/notumor/000.png
    assert item.patient == 'Testing/notumor/000.png'


def test_bad_files_name_the_file(tmp_path):
    write_folder(tmp_path, per_class=3)
    (tmp_path / 'glioma' / 'empty.png').write_bytes(b'')
    (tmp_path / 'glioma' / 'text.png').write_text('hello, not a picture')
    png_header(tmp_path / 'notumor' / 'bomb.png', 30000, 30000)
    (tmp_path / 'stray.jpg').write_bytes(b'')
    dataset = open_dataset(tmp_path)
    found = scan(dataset, skip_bad=True, quiet=True)
    assert len(found.slices) == 9
    reasons = {problem.ref.rsplit('/', 1)[-1]: problem.reason for problem in found.skipped}
    assert reasons['empty.png'] == 'cannot be read as an image: it is empty (0 bytes); expected a PNG or JPEG image'
    assert reasons['text.png'].startswith("cannot be read as an image: it is text, starting 'hello, not a picture'")
    assert reasons['bomb.png'] == ('image is 30000×30000 pixels; expected sides from 2 to 4096 (refused from its '
                                   'header, before decoding)')
    assert reasons['stray.jpg'] == 'not in a class subfolder: move it into the folder of its class'
    with pytest.raises(DataError, match=r'stray\.jpg: not in a class subfolder'):
        scan(dataset, quiet=True)
    (tmp_path / 'stray.jpg').unlink()
    with pytest.raises(DataError, match=r'empty\.png: cannot be read as an image'):
        load_split(tmp_path, quiet=True)


def test_masks_and_patients_csv_are_checked(tmp_path):
    write_folder(tmp_path, per_class=3)
    Image.fromarray(np.zeros((5, 5), np.uint8)).save(tmp_path / 'masks' / 'glioma' / '000.png')
    blurred = square_mask()
    blurred[0, 0] = 7
    Image.fromarray(blurred).save(tmp_path / 'masks' / 'glioma' / '001.png')
    dataset = open_dataset(tmp_path)
    with pytest.raises(DataError, match=r'000\.png: its mask .*000\.png is 5×5 pixels but the image is 16×12'):
        dataset.read(tmp_path / 'glioma' / '000.png')
    with pytest.raises(DataError, match=r'001\.png: its mask .* holds 3 values \(0, 7, 255\); expected 0 outside'):
        dataset.read(tmp_path / 'glioma' / '001.png')
    (tmp_path / 'patients.csv').write_text('file,patient\nglioma/000.png,P1\n')
    with pytest.raises(DataError, match=r"001\.png: no patient id: .*patients\.csv has no row for 'glioma/001\.png'"):
        open_dataset(tmp_path).read(tmp_path / 'glioma' / '001.png')
    (tmp_path / 'patients.csv').write_text('name,id\n')
    with pytest.raises(DataError, match=r"patients\.csv: the first line is 'name,id'; expected the header"):
        open_dataset(tmp_path)
    (tmp_path / 'patients.csv').write_text('file,patient\nglioma/000.png,P1\nglioma/000.png,P2\n')
    with pytest.raises(DataError, match=r"patients\.csv: line 3 names 'glioma/000\.png' again"):
        open_dataset(tmp_path)


# --- splits and the report ----------------------------------------------------------------------------------------

def test_split_keeps_patients_apart_and_says_when_it_cannot(tmp_path):
    written = write_folder(tmp_path / 'with', per_class=6)
    with warnings.catch_warnings():
        warnings.simplefilter('error', PatientLeakageWarning)
        split = load_split(tmp_path / 'with', quiet=True)
    patient = {str(tmp_path / 'with' / name): values[2] for name, values in written.items()}
    parts = [{patient[ref] for ref in refs} for refs in split.parts().values()]
    assert all(refs for refs in split.parts().values()) and not (parts[0] & parts[1] or parts[0] & parts[2]
                                                                 or parts[1] & parts[2])
    write_folder(tmp_path / 'without', per_class=6, patients=False)
    with pytest.warns(PatientLeakageWarning, match='no patient ids .*the split is by file'):
        split = load_split(tmp_path / 'without', quiet=True)
    assert sum(len(refs) for refs in split.parts().values()) == 18
    with pytest.raises(DataError, match="split method 'cvind' but no cvind.mat found"):
        load_split(tmp_path / 'without', method='cvind', quiet=True)


def test_data_command_reports_classes_and_problems(tmp_path):
    write_folder(tmp_path, per_class=3, patients=False)
    (tmp_path / 'glioma' / 'text.png').write_text('hello')
    result = CliRunner().invoke(main, ['data', str(tmp_path), '--quiet'])
    assert result.exit_code == 1, result.output
    lines = result.output.splitlines()
    assert lines[0] == f'dataset {tmp_path}: 9 slices of 9 patients'
    assert lines[2:5] == ['  1 glioma           3         3', '  2 meningioma       3         3',
                          '  3 notumor          3         3']
    assert 'split: patient (seed 0), by file: no patient ids' in lines
    assert 'problems: 1 file: 1 not an image' in lines and not any('slices by patient' in line for line in lines)
    assert any('no patient ids (patients.csv)' in line for line in lines)
    report = check_dataset(tmp_path, skip_bad=True, quiet=True)
    assert [info.class_name for info in report.scan.slices].count('notumor') == 3


# --- the transform's scaling --------------------------------------------------------------------------------------

def test_fixed_scaling_divides_by_the_bit_depth(tmp_path):
    image = np.array([[0, 51], [102, 255]], dtype=np.float64)
    fixed = Transform(size=2, scaling='fixed')
    np.testing.assert_allclose(fixed(image, full_scale=255.)[0][0].numpy(), image / 255, rtol=1e-6)
    np.testing.assert_allclose(fixed(image * 257, full_scale=65535.)[0][0].numpy(), image / 255, rtol=1e-6)
    np.testing.assert_allclose(Transform(size=2, scaling=510)(image)[0][0].numpy(), image / 510, rtol=1e-6)
    stretched = Transform(size=2, value_range=(-1., 1.), scaling='fixed')(image, full_scale=255.)[0][0]
    np.testing.assert_allclose(stretched.numpy(), image / 255 * 2 - 1, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(Transform(size=2)(image + 51)[0][0].numpy(), image / 255, rtol=1e-6)  # min–max
    assert Transform(size=2).to_dict() == {'size': 2, 'value_range': [0., 1.], 'flips': False, 'mean': None,
                                           'std': None}
    assert fixed.to_dict()['scaling'] == 'fixed' and Transform.from_dict(fixed.to_dict()) == fixed
    with pytest.raises(DataError, match="transform scaling 'fixed' divides by the full scale .*a float image"):
        fixed(image)
    with pytest.raises(DataError, match="transform scaling must be 'minmax', 'fixed' or a positive divisor, got 0"):
        Transform(scaling=0)
    write_folder(tmp_path, per_class=1, masks=False)
    dataset = open_dataset(tmp_path)
    item = SliceDataset(dataset.list_files()[0], Transform(size=16, scaling='fixed'), dataset.read)[0]
    # the 12×16 image is padded to 16×16 with two rows above and below, then kept at 16×16: the rows are its own
    np.testing.assert_allclose(item['image'][0, 2:14].numpy(), grey(0) / 255, rtol=1e-6)


# --- the commands -------------------------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def folder_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp('images')
    write_folder(root / 'data', per_class=4, masks=False, patients=False)
    return root, str(root / 'data'), write_checkpoint(root / 'model.pt')


def test_model_of_other_classes_is_refused_with_both_lists(folder_setup, tmp_path):
    root, data, _ = folder_setup
    other = write_checkpoint(tmp_path / 'other.pt', class_names=CLASS_NAMES)
    message = (r"the model's classes \(meningioma, glioma, pituitary\) are not the data's \(glioma, meningioma, "
               r'notumor\), in this order')
    with pytest.raises(DataError, match=message):
        open_source(other, data, quiet=True)
    for command in (['explain', '--data', data, '--index', '0'], ['evaluate', '--data', data]):
        result = CliRunner().invoke(main, [*command, '--checkpoint', other, '--quiet', '--device', 'cpu',
                                           '--out', str(tmp_path / command[0])])
        assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1, result.output
        assert "the model's classes (meningioma, glioma, pituitary) are not the data's" in result.output


def test_evaluate_without_masks_scores_faithfulness_only(folder_setup):
    root, data, checkpoint = folder_setup
    out = root / 'evaluation'
    with pytest.warns(PatientLeakageWarning):
        result = CliRunner().invoke(main, ['evaluate', '--data', data, '--checkpoint', checkpoint, '--out', str(out),
                                           '--quiet', '--device', 'cpu', '--steps', '4', '--figures', '0'])
    assert result.exit_code == 0, result.output
    rows = read_csv(out / 'rows.csv')
    assert rows and all({'morf_auc', 'lerf_auc', 'faithfulness_gap'} <= set(row) for row in rows)
    assert not any(name in rows[0] for name in ('iou', 'pointing_game', 'empty_mask'))
    assert json.loads((out / 'summary.json').read_text())['settings']['criteria'] == ['faithfulness']
    with pytest.warns(PatientLeakageWarning):
        source = open_source(checkpoint, data, quiet=True)
    with pytest.raises(ValueError, match='the data has no tumour masks, so localisation cannot be scored'):
        evaluate(source, 'test', progress=False, criteria='localisation')


def test_evaluate_with_some_masks_leaves_the_unmasked_out_of_localisation(tmp_path):
    write_folder(tmp_path / 'data', per_class=6)
    source = open_source(write_checkpoint(tmp_path / 'model.pt'), str(tmp_path / 'data'), quiet=True)
    rows = [row for part in ('train', 'val', 'test')
            for row in evaluate(source, part, progress=False, perturbation={'steps': 4})[0]]
    assert len(rows) == 18
    unmasked = [row for row in rows if row['file'].endswith('005.png')]  # the images written without a mask
    assert unmasked and all(row['iou'] != row['iou'] and row['empty_mask'] for row in unmasked)
    assert all(row['iou'] == row['iou'] and row['faithfulness_gap'] == row['faithfulness_gap']
               for row in rows if row not in unmasked)


def test_explain_sweep_and_train_run_on_an_image_folder(folder_setup):
    root, data, checkpoint = folder_setup
    runner = CliRunner()
    result = runner.invoke(main, ['explain', '--data', data, '--index', '5', '--checkpoint', checkpoint, '--quiet',
                                  '--device', 'cpu', '--out', str(root / 'explained')])
    assert result.exit_code == 0, result.output
    assert 'meningioma/001.png, patient meningioma/001.png\n  label meningioma' in result.output
    assert 'no tumour mask, so no metrics' in result.output and (root / 'explained' / '001.png.png').exists()
    with pytest.warns(PatientLeakageWarning):
        result = runner.invoke(main, ['sweep', '--data', data, '--checkpoint', checkpoint, '--quiet', '--device', 'cpu',
                                      '--eps', '0,1', '--gamma', '0', '--objective', 'faithfulness', '--metrics',
                                      'faithfulness', '--steps', '4', '--out', str(root / 'sweep')])
    assert result.exit_code == 0, result.output
    choice = json.loads((root / 'sweep' / 'choice.json').read_text())
    assert choice['objective'] == 'faithfulness' and set(choice['test']) == {'morf_auc', 'lerf_auc',
                                                                             'faithfulness_gap'}
    with pytest.warns(PatientLeakageWarning):
        result = runner.invoke(main, ['train', '--data', data, '--arch', 'vgg11', '--width', '2', '--size', '32',
                                      '--epochs', '1', '--batch-size', '4', '--device', 'cpu', '--quiet',
                                      '--out', str(root / 'trained.pt')])
    assert result.exit_code == 0, result.output
    _, meta = load_checkpoint(root / 'trained.pt')
    assert meta['class_names'] == list(CLASSES) and meta['num_classes'] == 3
