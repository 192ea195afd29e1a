"""The one place poolq's version is written."""

VERSION = "0.1.0"
