"""Every privacy-critical line of fedjax-dp: clipping, noise, sampling, ledger."""
