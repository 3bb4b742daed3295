"""Runs `gcp-storage-emulator` with the one JSON API call it lacks: moveTo.

gcsfs (>= 2025) renames an object with `POST .../o/SRC/moveTo/o/DST` and,
when the server answers 501, retries for about 30 seconds before falling
back to copy + delete; every `epath` rename (atomic files and directories)
would pay that. The emulator serves copy and delete, so moveTo is added here
as exactly that pair. Everything else is the emulator as released.

Usage: python tests/gcs_emulator.py start --host 127.0.0.1 --port N ...
(the emulator's own command line).
"""

import sys
from http import HTTPStatus

from gcp_storage_emulator import __main__ as emulator_main
from gcp_storage_emulator import server, settings
from gcp_storage_emulator.exceptions import NotFound
from gcp_storage_emulator.handlers import objects


def move(request, response, storage, *args, **kwargs):
  """moveTo within one bucket: copy, then delete the source."""
  bucket = request.params["bucket_name"]
  src, dst = request.params["object_id"], request.params["dest_object_id"]
  try:
    resource = objects._copy(request.base_url, storage, bucket, src, bucket,  # pylint: disable=protected-access
                             dst)
    storage.delete_file(bucket, src)
  except NotFound:
    response.status = HTTPStatus.NOT_FOUND
    return
  response.json(resource)


_MOVE = (rf"^{settings.API_ENDPOINT}/b/(?P<bucket_name>[-.\w]+)/o/"
         r"(?P<object_id>.*[^/]+)/moveTo/o/(?P<dest_object_id>.*[^/]+)$",
         {server.POST: move})

if __name__ == "__main__":
  server.HANDLERS = (_MOVE,) + tuple(server.HANDLERS)
  sys.exit(emulator_main.main(sys.argv[1:]))
