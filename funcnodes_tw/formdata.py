"""
The multipart parser, imported at the first upload and not before.

streaming_form_data's parser imports its C{targets} module, which imports
smart_open and requests (~8 MB and ~0.1 s) for cloud targets we never use;
a worker that is never sent a file never pays for them.
"""

from streaming_form_data import StreamingFormDataParser
from streaming_form_data.targets import BaseTarget


class FileTarget(BaseTarget):
    """
    Streams each C{file} part of a multipart body into its staged file.
    """

    def __init__(self, staging):
        super().__init__()
        self.staging = staging
        self._file = None

    def on_start(self):
        if self.multipart_filename:
            self._file = self.staging.open(self.multipart_filename)

    def on_data_received(self, chunk):
        if self._file is not None:
            self._file.write(chunk)

    def on_finish(self):
        if self._file is not None:
            self._file.close()
            self._file = None

