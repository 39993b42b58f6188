"""What the verb modules share: opening the store, the progress line, and the
few words every summary line uses."""

from __future__ import annotations

import logging

from engine.progress import Progress


def progress_for(args, label: str, finishing: str = "syncing") -> Progress:
    """A progress line on a terminal; none with --json or -q (stdout and stderr stay clean for scripts)."""
    return Progress(label, enabled=False if (args.json or args.quiet) else None, finishing=finishing)


def add_store_arg(sp) -> None:
    """STORE and the options of a store in a bucket, the same for every command that takes STORE."""
    action = sp.add_argument("store", metavar="STORE", help="the store: a directory, or s3://BUCKET/PREFIX")
    action._s3_store = True  # engine/cli/__init__.py add_store_options adds the S3 options once all are known


def add_store_option(sp) -> None:
    """``--store STORE``, for a command where the store is optional (``vsphere vms``):
    the same store options as add_store_arg's STORE."""
    action = sp.add_argument("--store", metavar="STORE", help="a store: a directory, or s3://BUCKET/PREFIX")
    action._s3_store = True


def add_s3_options(sp) -> None:
    """--endpoint, --cache, --credentials, --ca-file; where a command already has one of
    these for something else (backup's vSphere --credentials, mount's --cache SIZE) the
    S3 option is spelled --s3-credentials, --s3-cache (both spellings elsewhere)."""
    taken = set(sp._option_string_actions)
    g = sp.add_argument_group("a store in a bucket (s3://BUCKET/PREFIX)",
                              "secrets only from BLOCKVAULT_S3_ACCESS_KEY_ID / BLOCKVAULT_S3_SECRET_ACCESS_KEY "
                              f"(or AWS_*, ~/.aws) or {'--s3' if '--credentials' in taken else '-'}-credentials "
                              "FILE, never on the command line")
    spelled = {}

    def opt(name, **kw):
        names = [f"--s3-{name}"] + ([f"--{name}"] if f"--{name}" not in taken else [])
        spelled[name] = names[-1]
        g.add_argument(*names[::-1], dest=f"s3_{name.replace('-', '_')}", **kw)
    opt("endpoint", metavar="URL", help="the S3 endpoint, e.g. http://127.0.0.1:7480 (default: "
        "BLOCKVAULT_S3_ENDPOINT, else AWS)")
    opt("cache", metavar="DIR", help="this host's cache of the store: index, locks, upload spool (default: "
        "$BLOCKVAULT_CACHE/BUCKET/PREFIX or ~/.cache/blockvault/s3/BUCKET/PREFIX)")
    opt("credentials", metavar="FILE", help="a file of 'key = value' lines: access_key_id, secret_access_key, "
        "region, endpoint (mode 0600)")
    opt("ca-file", metavar="FILE", help="PEM certificates to verify the endpoint's TLS with")
    sp.set_defaults(s3_spelled=spelled)   # a usage error names --s3-credentials where that is the option


def s3_settings(args):
    """The S3Settings of the command's options (None for a local store)."""
    return s3_settings_of(getattr(args, "store", "") or "", args.s3_endpoint, args.s3_credentials,
                          args.s3_ca_file, args.s3_cache, spelled=getattr(args, "s3_spelled", None))


def s3_settings_of(store: str, endpoint, credentials, ca_file, cache, option_prefix: str = "--", spelled=None):
    """The S3Settings of one store's options (None for a local store, where giving any
    of them is a usage error naming the option as the user spelled it)."""
    from chunkstore.s3settings import S3Settings, is_store_url
    if not is_store_url(store):
        given = {"endpoint": endpoint, "cache": cache, "credentials": credentials, "ca-file": ca_file}
        for opt, value in given.items():
            if value:
                from engine.errors import UsageError
                name = (spelled or {}).get(opt, f"{option_prefix}{opt}")
                raise UsageError(f"{name} is for a store in a bucket (s3://BUCKET/PREFIX); "
                                 f"{store} is a local directory")
        return None
    return S3Settings.resolve(endpoint, credentials, ca_file)


def store_kwargs(args) -> dict:
    settings = s3_settings(args)
    return {} if settings is None else {"cache": args.s3_cache, "s3_settings": settings}


def open_repo(args):
    """The store named by ``args.store``; imported late so ``--help`` stays fast."""
    from engine.repository import Repository
    return Repository.open(args.store, **store_kwargs(args))


def seconds(t: float) -> str:
    return f"{t:.1f} s"


def count(n: int, what: str) -> str:
    return f"{n} {what}{'' if n == 1 else 's'}"


def warn_bad_records(bad: list[dict]) -> None:
    """Damaged catalog records are skipped by list and stats, and said so."""
    for b in bad:
        logging.getLogger("blockvault.catalog").warning(f"{b['reason']}; skipped (run 'blockvault verify')")
