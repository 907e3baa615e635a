"""At-rest encryption: LUKS2 headers and keyslots (libcryptsetup), key files.

The per-sector AES-XTS work is not here: it runs in the C datapath
(cffi_build/nitro_xts.c) with keys that live only in C memory.
"""
