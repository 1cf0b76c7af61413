from api.gateway.app import serve

serve()
