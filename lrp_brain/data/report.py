"""What ``lrp-brain data`` checks and prints: every file read once, every problem, the split."""
import os
import warnings
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Optional

from lrp_brain.data.dataset import Scan, open_dataset, scan, summarise_problems
from lrp_brain.data.files import DataError, Problem, natural_key
from lrp_brain.data.splits import PatientLeakageWarning, Split, _source_cvind, make_split, shared_patients

@dataclass
class DatasetReport:
    """What ``lrp-brain data`` prints: the scan, the split and every problem.

    Attributes
    ----------
    scan: Scan
    split: Split or None
        ``None`` where no split could be made.
    problems: list of Problem
        The scan's problems and the split's (files of a split file that are not readable slices, shared patients).
    split_note: str
        Where the split came from (made, loaded from or saved to a file) or why there is none.
    """
    scan: Scan
    split: Optional[Split]
    problems: list
    split_note: str

    @property
    def fatal_problems(self):
        """The problems that make the dataset fail the check (bad files, split files naming missing slices)."""
        return [problem for problem in self.problems if problem.fatal]

    @property
    def ok(self):
        """``True`` where no problem is fatal."""
        return not self.fatal_problems

    def format(self):
        """The report as text."""
        slices = self.scan.slices
        patients_by_class = defaultdict(set)
        for info in slices:
            patients_by_class[info.label].add(info.patient)
        slice_counts = Counter(info.label for info in slices)
        lines = [f'dataset {self.scan.root}: {len(slices)} slices of {len({i.patient for i in slices})} patients',
                 f'  {"class":<12}{"slices":>8}{"patients":>10}']
        for label, name in enumerate(self.scan.class_names):
            lines.append(f'  {f"{label + 1} {name}":<12}{slice_counts[label]:>8}{len(patients_by_class[label]):>10}')
        sizes = Counter(info.size for info in slices)
        lines.append('image sizes: ' + ', '.join(f'{h}×{w}: {count}' for (h, w), count in sorted(sizes.items())))
        per_patient = Counter(info.patient for info in slices)
        if per_patient and self.scan.has_patients:
            counts = sorted(per_patient.values())
            lines.append(f'slices per patient: min {counts[0]}, median {counts[len(counts) // 2]}, max {counts[-1]}')
            entries = [f'{patient} {count}'
                       for patient, count in sorted(per_patient.items(), key=lambda item: natural_key(item[0]))]
            lines.append('slices by patient:')
            for entry in entries:  # wrapped at 120 characters, never inside an entry
                if len(lines[-1]) + len(entry) + 2 > 120:
                    lines[-1] += ','
                    lines.append(' ')
                lines[-1] += (' ' if lines[-1].endswith((':', ' ')) else ', ') + entry
        lines.append(f'split: {self.split_note}')
        if self.split is not None:
            info_by_ref = {info.path: info for info in slices}
            for name, refs in self.split.parts().items():
                infos = [info_by_ref[ref] for ref in refs if ref in info_by_ref]
                patients = {info.patient for info in infos}
                labels = Counter(info.label for info in infos)
                by_class = ', '.join(f'{name} {labels[label]}' for label, name in enumerate(self.scan.class_names))
                lines.append(f'  {name:<6}{len(refs):>6} slices {len(patients):>5} patients  ({by_class})')
        fatal = self.fatal_problems
        flagged = [problem for problem in self.problems if not problem.fatal]
        lines.append(f'problems: {summarise_problems(fatal) if fatal else "none"}')
        lines.extend(f'  {problem.message}' for problem in fatal)
        if flagged:
            lines.append(f'flagged (allowed): {len(flagged)}')
            lines.extend(f'  {problem.message}' for problem in flagged)
        return '\n'.join(lines)


def check_dataset(source, split_file=None, method='patient', seed=0, skip_bad=False, quiet=False):
    """Validate a dataset: read every file once, collect every problem, make or check the split.

    Parameters
    ----------
    source: str, os.PathLike, list of them, or a dataset
        The dataset (see :func:`lrp_brain.data.dataset.open_dataset`).
    split_file: str or os.PathLike, optional
        A split to check against the dataset if the file exists; otherwise the split made is saved there (only
        when there is no fatal problem, or ``skip_bad``).
    method, seed:
        How to make the split when there is no split file (see :func:`make_split`).
    skip_bad: bool
        Whether a split may be saved despite bad files (they are left out of it).
    quiet: bool
        Hide the progress bar.

    Returns
    -------
    DatasetReport
        Every problem: bad files never stop the scan here.
    """
    source = open_dataset(source)
    dataset = scan(source, skip_bad=True, quiet=quiet)
    problems = list(dataset.problems)
    split, note = None, ''
    try:
        if split_file is not None and os.path.exists(split_file):
            split = Split.load(split_file, root=dataset.root)
            note = f'{split.method} (seed {split.seed}) from {split_file}'
            readable = {info.path for info in dataset.slices}
            for ref in (ref for refs in split.parts().values() for ref in refs if ref not in readable):
                problems.append(Problem(ref, f'in split file {split_file} but not a readable slice', 'split'))
        elif dataset.slices:
            with warnings.catch_warnings():
                warnings.simplefilter('ignore', PatientLeakageWarning)
                split = make_split(dataset.slices, method, seed, cvind=_source_cvind(source, method),
                                   root=dataset.root)
            split.skipped = [[problem.ref, problem.message] for problem in dataset.skipped]
            note = f'{method} (seed {seed}{f", folds {split.folds}" if split.folds else ""})' + \
                ('' if dataset.has_patients or method == 'random' else ', by file: no patient ids')
            if split_file is not None and (skip_bad or not dataset.skipped):
                split.save(split_file)
                note += f', saved to {split_file}'
        else:
            note = 'none (no readable slices)'
    except DataError as error:
        problems.append(Problem(error.ref or 'split', error.reason, error.kind))
        note = f'none ({error})'
    if split is not None:
        sizes = ', '.join(f'{name} {len(refs)}' for name, refs in split.parts().items())
        problems += [Problem('split', f'the {name} part is empty ({sizes} slices); evaluate, sweep and train need '
                                      f'slices in every part: add patients or choose another split', 'empty split')
                     for name, refs in split.parts().items() if not refs]
        for patient, parts in shared_patients(split, dataset.slices).items():
            problems.append(Problem(
                f'patient {patient}', f'in {" and ".join(parts)} (patient leakage)', 'patient leakage',
                fatal=split.method != 'random',
            ))
    return DatasetReport(dataset, split, problems, note)
