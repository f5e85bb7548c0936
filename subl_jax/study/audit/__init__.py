"""The transfer audit (issue #20): signals of hidden-trait risk and their calibration against realised transfer."""
