"""The core every protocol calls: validate, admit, infer, statistics, readiness."""
