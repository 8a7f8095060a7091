"""The label and demographics CSVs of both releases, with their quirks."""

import numpy as np
import pytest

from ichseg.data.ctich import read_demographics, read_slice_labels
from ichseg.errors import DatasetError

LABEL_HEADER = (
    "PatientNumber,SliceNumber,Intraventricular,Intraparenchymal,Subarachnoid,Epidural,Subdural,"
    "No_Hemorrhage,Fracture_Yes_No"
)


def write(path, text, bom=False, crlf=False):
    if crlf:
        text = text.replace("\n", "\r\n")
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode("utf-8"))
    return path


@pytest.mark.parametrize("bom,crlf", [(False, False), (True, True), (True, False), (False, True)])
def test_label_csv_with_and_without_bom_and_crlf(tmp_path, bom, crlf):
    text = (
        f"{LABEL_HEADER}\n"
        "49,2,0,0,0,1,0,0,1\n"  # rows out of order on purpose
        "49,1,0,0,0,0,0,1,0\n"
        "50,1,1,1,0,0,0,0,0\n"
    )
    labels = read_slice_labels(write(tmp_path / "hemorrhage_diagnosis.csv", text, bom, crlf))
    assert sorted(labels) == [49, 50]  # plain integer ids
    assert labels[49].n_slices == 2
    np.testing.assert_array_equal(labels[49].subtypes, [[0, 0, 0, 0, 0], [0, 0, 0, 1, 0]])
    np.testing.assert_array_equal(labels[49].no_hemorrhage, [True, False])
    np.testing.assert_array_equal(labels[49].fracture, [False, True])
    np.testing.assert_array_equal(labels[49].has_ich, [False, True])
    np.testing.assert_array_equal(labels[50].patient_subtypes(), [1, 1, 0, 0, 0])


def test_label_csv_missing_column_names_file_and_column(tmp_path):
    path = write(
        tmp_path / "hemorrhage_diagnosis_raw_ct.csv", LABEL_HEADER.replace(",Subdural", "") + "\n"
    )
    with pytest.raises(
        DatasetError, match=r"hemorrhage_diagnosis_raw_ct\.csv: missing column\(s\) Subdural"
    ):
        read_slice_labels(path)


def test_label_csv_gap_in_slice_numbers(tmp_path):
    path = write(
        tmp_path / "labels.csv", f"{LABEL_HEADER}\n49,1,0,0,0,0,0,1,0\n49,3,0,0,0,0,0,1,0\n"
    )
    with pytest.raises(DatasetError, match="slice numbers of patient 49 are not 1..2"):
        read_slice_labels(path)


def test_label_csv_non_numeric_value(tmp_path):
    path = write(tmp_path / "labels.csv", f"{LABEL_HEADER}\n49,1,0,x,0,0,0,1,0\n")
    with pytest.raises(DatasetError, match="labels.csv: line 2 has a missing or non-numeric value"):
        read_slice_labels(path)


def test_demographics_1_0_0_header_with_newline_inside_quotes(tmp_path):
    text = (
        '"Patient Number","Age\n(years)","Gender",'
        '"Intraventricular","Intraparenchymal","Subarachnoid",'
        '"Epidural","Subdural","Fracture (Yes/No)","Condition on file","Note"\n'
        "49,35,Male,,,,1,,1,Hemorrhage,\n"
        "50,0.5,Female,,,,,,,No Hemorrhage,premature\n"
    )
    demographics = read_demographics(
        write(tmp_path / "patient_demographics.csv", text, bom=True, crlf=True)
    )
    assert demographics[49].age == 35 and demographics[49].gender == "Male"
    assert demographics[50].age == 0.5 and demographics[50].note == "premature"


def test_demographics_1_3_x_merged_header_and_subheader_row(tmp_path):
    text = (
        'Patient Number,"Age\n(years)",Gender,'
        "Hemorrhage type based on the radiologists diagnosis ,,,,,"
        "Fracture (yes 1/no 0),Note1\n"
        ",,,Intraventricular,Intraparenchymal,Subarachnoid,Epidural,Subdural,,\n"
        "49,35,Male,,,,1,,1,\n"
        "66,72,Female,1,,,,,,\n"
    )
    demographics = read_demographics(write(tmp_path / "Patient_demographics.csv", text))
    assert sorted(demographics) == [49, 66]
    assert demographics[66].age == 72 and demographics[66].gender == "Female"


def test_demographics_without_age_column(tmp_path):
    path = write(tmp_path / "patient_demographics.csv", "Patient Number,Gender\n49,Male\n")
    with pytest.raises(DatasetError, match="patient_demographics.csv: no age column"):
        read_demographics(path)
