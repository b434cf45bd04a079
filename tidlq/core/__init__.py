"""What every part of tidlq stands on: params, the stage cache, atomic files, errors, input files, S3."""
