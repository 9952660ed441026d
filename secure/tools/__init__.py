"""Evaluation tools: the local three-party harness, secure-vs-plaintext agreement, cost measurement, the stock-CrypTen benchmark, network testbeds and models."""
