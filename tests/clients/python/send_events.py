"""Sends identify, group, page and track calls through Segment's Python
library (segment-analytics-python) or, with --library rudder, RudderStack's
(rudder-sdk-python, which puts identify traits only in context.traits) to a
server given as --host, then prints a JSON summary on stdout. Run by
tests/segment_clients.rs.

Every call has its own user ID (`{prefix}-{i}`), so the test can tell which
calls reached the fake Totango. With --bad-item one extra track call carries
a wrongly typed field (`context.groupId` as an object) in the same batch as
good calls. With --big-item one extra track call carries a 40 KB property,
over the server's per-message limit.
"""

import argparse
import json
import sys


CALLS = ("identify", "group", "page", "track")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--host", required=True)
    p.add_argument("--write-key", required=True)
    p.add_argument("--count", type=int, default=1000)
    p.add_argument("--prefix", default="py")
    p.add_argument("--bad-item", action="store_true")
    p.add_argument("--big-item", action="store_true")
    p.add_argument("--library", choices=("segment", "rudder"), default="segment")
    args = p.parse_args()
    if args.library == "rudder":
        from rudderstack.analytics import Client
    else:
        from segment.analytics import Client

    errors = {}

    def on_error(error, items):
        why = str(error)
        errors[why] = errors.get(why, 0) + len(items)

    client = Client(
        write_key=args.write_key,
        host=args.host,
        on_error=on_error,
        gzip=True,
        max_retries=3,
        upload_size=100,
    )
    account = {"groupId": f"{args.prefix}-acct"}
    for i in range(args.count):
        user = f"{args.prefix}-{i}"
        call = CALLS[i % len(CALLS)]
        if call == "identify":
            client.identify(user, {"email": f"{user}@example.com", "plan": "Paying"}, context=account)
        elif call == "group":
            client.group(user, account["groupId"], {"name": "Acme", "plan": "Paying"})
        elif call == "page":
            client.page(user, name="Dashboard", properties={"url": "https://app.example/d"}, context=account)
        else:
            client.track(user, "Created Report", {"rows": i}, context=account)
        if args.bad_item and i == args.count // 2:
            client.track(f"{args.prefix}-bad", "Bad Item", {}, context={"groupId": {"id": "acme"}})
        if args.big_item and i == args.count // 2:
            client.track(f"{args.prefix}-big", "Big Item", {"blob": "x" * 40_000}, context=account)
    client.flush()
    client.shutdown()
    sent = args.count + (1 if args.bad_item else 0) + (1 if args.big_item else 0)
    json.dump({"sent": sent, "errors": errors}, sys.stdout)
    print()


if __name__ == "__main__":
    main()
