import os

# Some LitData versions query the package index whenever a dataset is built; tests run offline.
os.environ.setdefault("LITDATA_DISABLE_VERSION_CHECK", "1")
