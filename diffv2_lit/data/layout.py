"""The file names of a prepared data folder, shared by what writes it (`prepare`) and what reads it
(`folder`, `remote`):

    <output>/diffv2_data.json      METADATA_FILE: format, tokenizer, counts; written last
    <output>/.diffv2_prepare.json  PROGRESS_FILE: present while a run is writing the output
    <output>/train/, <output>/val/ SPLITS: LitData chunks and index.json
"""

METADATA_FILE = "diffv2_data.json"
FORMAT_NAME = "diffv2-lit-data"
FORMAT_VERSION = 1
SPLITS = ("train", "val")
# Written first into every output a run is making (a local run's hidden folder, an s3:// prefix) and
# removed when it is complete: with METADATA_FILE it is what marks a place as prepare's own, which is
# all that --overwrite may delete (issue 24.1).
PROGRESS_FILE = ".diffv2_prepare.json"
