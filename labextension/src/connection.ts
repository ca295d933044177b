/**
 * The `RequestFn` the panel uses in JupyterLab: `ServerConnection.makeRequest` adds the
 * Jupyter token and the XSRF header, and the URL honours the server's base_url.
 */

import { URLExt } from '@jupyterlab/coreutils';
import { ServerConnection } from '@jupyterlab/services';

import type { RequestFn } from './api';

/** Requests to `{baseUrl}xllm/<path>` with the current server's settings. */
export function jupyterRequest(settings: ServerConnection.ISettings = ServerConnection.makeSettings()): RequestFn {
  return (path: string, init: RequestInit = {}) => {
    const url = URLExt.join(settings.baseUrl, 'xllm', path);
    return ServerConnection.makeRequest(url, init, settings);
  };
}
