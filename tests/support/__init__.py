"""Code only the tests use: a fault-injecting S3 proxy, the checks of a carried calibration."""
